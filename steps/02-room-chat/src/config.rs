//! Settings, read once from the environment when the server starts.
//!
//! | variable   | default     | meaning                        |
//! |------------|-------------|--------------------------------|
//! | `HOST`     | `127.0.0.1` | address to listen on           |
//! | `PORT`     | `8080`      | port to listen on (0: any free) |
//! | `RUST_LOG` | `info`      | what to log (`tracing` filter) |
//!
//! A bad value stops the server at start with one line that says what is
//! wrong, rather than surprising you later.

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Host name or IP address, e.g. `127.0.0.1` or `0.0.0.0`.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Config {
    /// Reads `HOST` and `PORT`.
    pub fn from_env() -> Result<Config, String> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let host = lookup("HOST").unwrap_or_else(|| "127.0.0.1".to_owned());
        if host.trim().is_empty() {
            return Err("HOST is empty: set it to an address such as 127.0.0.1".to_owned());
        }
        let port = match lookup("PORT") {
            None => 8080,
            Some(port) => port
                .parse()
                .map_err(|_| format!("PORT must be a number from 0 to 65535, not {port:?}"))?,
        };
        Ok(Config { host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn defaults_to_localhost_8080() {
        let expected = Config {
            host: "127.0.0.1".into(),
            port: 8080,
        };
        assert_eq!(config(&[]), Ok(expected));
    }

    #[test]
    fn reads_host_and_port() {
        let expected = Config {
            host: "0.0.0.0".into(),
            port: 3000,
        };
        assert_eq!(
            config(&[("HOST", "0.0.0.0"), ("PORT", "3000")]),
            Ok(expected)
        );
    }

    #[test]
    fn a_bad_port_is_one_clear_error() {
        assert_eq!(
            config(&[("PORT", "80a")]),
            Err(r#"PORT must be a number from 0 to 65535, not "80a""#.to_owned())
        );
        assert!(config(&[("PORT", "70000")]).is_err());
        assert!(config(&[("HOST", " ")]).is_err());
    }
}
