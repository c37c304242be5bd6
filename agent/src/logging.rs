//! Log setup shared by every entry point (`edgefleet`, `edgefleet agent`,
//! `edgefleet-agent`), so they all start from the same default: `info` for
//! the edgefleet crates, `warn` for the libraries under them.
//!
//! The level comes from `--log-level`, else the `EDGEFLEET_LOG` environment
//! variable, else [`DEFAULT_LEVEL`]. Either takes a bare level (`error`,
//! `warn`, `info`, `debug`, `trace`, `off`), which sets the edgefleet crates'
//! level and keeps the libraries at `warn`, or a full `tracing` `EnvFilter`
//! directive (anything else, e.g. `info,edgefleet_fleet_server::rollout=debug`),
//! used as written. Lines go to stderr, coloured only on a terminal without
//! `NO_COLOR`.

use std::io::IsTerminal as _;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// The environment variable holding the log level or directive.
pub const ENV: &str = "EDGEFLEET_LOG";

/// The level of the edgefleet crates when neither `--log-level` nor
/// [`ENV`] says otherwise.
pub const DEFAULT_LEVEL: &str = "info";

/// The levels `--log-level` takes, for messages.
pub const LEVELS: &str = "error, warn, info, debug, trace, off";

/// The `--log-level` option; flatten it into an entry point's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log level of the edgefleet crates (error, warn, info, debug, trace, off;
    /// other libraries stay at warn), or a full tracing EnvFilter directive such as
    /// `info,edgefleet_fleet_server::rollout=debug`. Logs go to stderr.
    #[arg(
        long = "log-level",
        env = ENV,
        default_value = DEFAULT_LEVEL,
        value_name = "LEVEL|DIRECTIVE",
        global = true
    )]
    pub log_level: String,
}

impl Default for LogArgs {
    fn default() -> Self {
        LogArgs {
            log_level: DEFAULT_LEVEL.into(),
        }
    }
}

/// A log level or directive that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--log-level / {ENV}: `{spec}` is not a log level or an EnvFilter directive: {reason}")]
pub struct LogError {
    /// What was given.
    pub spec: String,
    /// The parser's message.
    pub reason: String,
}

/// The `EnvFilter` directive that `spec` (a `--log-level` or [`ENV`] value)
/// stands for: a bare level becomes `warn,edgefleet=LEVEL,rumqttd=off`
/// (target names match by prefix, so `edgefleet` covers every edgefleet crate;
/// rumqttd logs each client disconnect as an error, which is not news); any
/// other text is returned as written. Empty text means [`DEFAULT_LEVEL`].
pub fn directive(spec: &str) -> String {
    let spec = spec.trim();
    let spec = if spec.is_empty() { DEFAULT_LEVEL } else { spec };
    match spec.parse::<LevelFilter>() {
        Ok(level) if !spec.contains(['=', ',']) => {
            format!("warn,edgefleet={},rumqttd=off", level_name(level))
        }
        _ => spec.to_string(),
    }
}

fn level_name(l: LevelFilter) -> &'static str {
    match l.into_level() {
        None => "off",
        Some(tracing::Level::ERROR) => "error",
        Some(tracing::Level::WARN) => "warn",
        Some(tracing::Level::INFO) => "info",
        Some(tracing::Level::DEBUG) => "debug",
        Some(tracing::Level::TRACE) => "trace",
    }
}

/// The filter for `spec` (see [`directive`]).
///
/// # Errors
/// [`LogError`] naming the text when it is neither a level nor a valid directive.
pub fn filter(spec: &str) -> Result<EnvFilter, LogError> {
    let t = spec.trim();
    // A bare word is a (misspelt) level, not a target name: `EnvFilter`
    // would take `verbose` as "everything under target `verbose`" and so
    // silently turn every other line off.
    if !t.is_empty()
        && !t.contains(['=', ',', '['])
        && !t.contains("::")
        && t.parse::<LevelFilter>().is_err()
    {
        return Err(LogError {
            spec: spec.to_string(),
            reason: format!(
                "expected one of the levels {LEVELS}, or a directive such as `info,edgefleet_agent::update=debug`"
            ),
        });
    }
    let d = directive(spec);
    EnvFilter::builder().parse(&d).map_err(|e| LogError {
        spec: spec.to_string(),
        reason: e.to_string(),
    })
}

/// Installs the global subscriber for `args` (stderr; ANSI colour only when
/// stderr is a terminal and `NO_COLOR` is unset). A second call is a no-op.
///
/// # Errors
/// [`LogError`] when the level or directive does not parse.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    let filter = filter(&args.log_level)?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // Err only when a subscriber is already installed (tests): keep that one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_covers_the_edgefleet_crates_only() {
        assert_eq!(directive("info"), "warn,edgefleet=info,rumqttd=off");
        assert_eq!(directive("DEBUG"), "warn,edgefleet=debug,rumqttd=off");
        assert_eq!(directive("off"), "warn,edgefleet=off,rumqttd=off");
        assert_eq!(directive(""), "warn,edgefleet=info,rumqttd=off");
        assert_eq!(LogArgs::default().log_level, DEFAULT_LEVEL);
    }

    #[test]
    fn a_misspelt_level_is_refused_naming_it_and_the_levels() {
        for bad in ["verbose", "debg", " Verbose "] {
            let e = filter(bad).expect_err(bad);
            assert_eq!(
                e.to_string(),
                format!(
                    "--log-level / EDGEFLEET_LOG: `{bad}` is not a log level or an EnvFilter directive: \
                     expected one of the levels error, warn, info, debug, trace, off, \
                     or a directive such as `info,edgefleet_agent::update=debug`"
                )
            );
        }
        for good in [
            "debug",
            "WARN",
            "off",
            "edgefleet_agent::update",
            "rumqttd=off",
            "",
        ] {
            assert!(filter(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_directive_is_used_as_written() {
        let d = "info,rumqttd=off,edgefleet_fleet_server::rollout=debug";
        assert_eq!(directive(d), d);
        assert!(filter(d).is_ok());
    }

    #[test]
    fn a_bad_directive_names_the_option_and_the_text() {
        let e = filter("edgefleet=loud").expect_err("not a level");
        let s = e.to_string();
        assert!(
            s.contains("--log-level / EDGEFLEET_LOG") && s.contains("`edgefleet=loud`"),
            "{s}"
        );
    }
}
