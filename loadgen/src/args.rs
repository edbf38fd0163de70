//! `--name value` arguments, shared by the binaries of this package.

use std::str::FromStr;

/// Looks up `--name value` in the process arguments, with a default.
pub fn arg<T: FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    let flag = format!("--{name}");
    match args.iter().position(|arg| *arg == flag) {
        None => default,
        Some(index) => match args.get(index + 1).map(|value| value.parse()) {
            Some(Ok(value)) => value,
            _ => {
                eprintln!("error: {flag} needs a valid value");
                std::process::exit(2);
            }
        },
    }
}
