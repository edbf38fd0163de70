//! `--name value` arguments, shared by the binaries of this package.

use std::str::FromStr;

/// Looks up `--name value` in the process arguments, with a default.
pub fn arg<T: FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    match arg_in(&args, name, default) {
        Ok(value) => value,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    }
}

/// Looks up `--name value` in `args`, with a default; an error if the flag
/// is there without a valid value. Separate from [`arg`] so that a binary
/// can test its parsing without a process.
pub fn arg_in<T: FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    let flag = format!("--{name}");
    match args.iter().position(|arg| *arg == flag) {
        None => Ok(default),
        Some(index) => match args.get(index + 1).map(|value| value.parse()) {
            Some(Ok(value)) => Ok(value),
            _ => Err(format!("{flag} needs a valid value")),
        },
    }
}
