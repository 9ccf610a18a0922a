//! The mechanism behind [`crate::ServerConfig`]: one list of settings (the [`settings!`] call in
//! `config.rs`) becomes the struct the server reads, its `Default`, a [`ServerConfigLayer`] of
//! optional values that TOML files deserialize into, and the `serve` flags (clap, with the
//! `DJINN_*` environment variable of each and its default in `--help`).
//!
//! Layering, lowest first: defaults < config file < environment < flags. clap reads a flag and
//! its environment variable into the same layer (a flag beats its variable), which is applied
//! over the file's layer, which is applied over the defaults. A value replaces the one below it
//! whole (a list from the flags replaces the file's list). Relative paths in a file resolve
//! against the file's folder; on the command line, against the working directory.
//!
//! [`crate::ServerConfigLayer`]: crate::config::ServerConfigLayer

use std::path::{Path, PathBuf};

use clap::builder::{BoolishValueParser, ValueParser};
use clap::{Arg, ArgAction, ArgMatches};

/// A type one setting can hold. Implemented for the scalars settings use; `Option<T>` and
/// `Vec<T>` of them are settings too (see [`Setting`]).
pub trait Scalar: Clone + Send + Sync + 'static {
    /// Placeholder in `--help` (`--max-connections <N>`).
    const VALUE_NAME: &'static str;
    fn parser() -> ValueParser;
    /// How `--help` writes a default.
    fn show(&self) -> String;
    /// Makes a path read from a file relative to that file's folder.
    fn resolve(&mut self, _base: &Path) {}
    /// The flag: one value per occurrence.
    fn arg(a: Arg) -> Arg {
        a.value_parser(Self::parser()).action(ArgAction::Set).value_name(Self::VALUE_NAME)
    }
}

macro_rules! scalar {
    ($($t:ty => $name:literal),*) => {$(
        impl Scalar for $t {
            const VALUE_NAME: &'static str = $name;
            fn parser() -> ValueParser {
                clap::value_parser!($t).into()
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
scalar!(usize => "N", u64 => "N", f64 => "X", String => "TEXT");

impl Scalar for PathBuf {
    const VALUE_NAME: &'static str = "PATH";
    fn parser() -> ValueParser {
        clap::value_parser!(PathBuf)
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
    fn resolve(&mut self, base: &Path) {
        if self.is_relative() {
            *self = base.join(&*self);
        }
    }
}

impl Scalar for bool {
    const VALUE_NAME: &'static str = "BOOL";
    fn parser() -> ValueParser {
        BoolishValueParser::new().into()
    }
    fn show(&self) -> String {
        self.to_string()
    }
    /// `--force-socket` alone means true; `--force-socket=false` overrides a file's `true`.
    fn arg(a: Arg) -> Arg {
        a.value_parser(Self::parser())
            .action(ArgAction::Set)
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_name(Self::VALUE_NAME)
    }
}

/// What one field of the settings list is: how its flag is built, read back, and shown.
///
/// A setting with `FLAG = false` (a table of the config file, such as the tenant quotas) has no
/// flag and no environment variable: only a file sets it.
pub trait Setting: Sized {
    /// Whether the setting is a flag (and a `DJINN_*` variable) too.
    const FLAG: bool = true;
    fn arg(a: Arg) -> Arg {
        a
    }
    /// The value the flag or its environment variable gave, if either did.
    fn get(_m: &ArgMatches, _id: &str) -> Option<Self> {
        None
    }
    /// The default as `--help` shows it; `None` when the field's doc says what absence means.
    fn show_default(&self) -> Option<String> {
        None
    }
    fn resolve(&mut self, _base: &Path) {}
}

impl<T: Scalar> Setting for T {
    fn arg(a: Arg) -> Arg {
        T::arg(a)
    }
    fn get(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_one::<T>(id).cloned()
    }
    fn show_default(&self) -> Option<String> {
        Some(self.show()).filter(|s| !s.is_empty())
    }
    fn resolve(&mut self, base: &Path) {
        Scalar::resolve(self, base)
    }
}

impl<T: Scalar> Setting for Option<T> {
    fn arg(a: Arg) -> Arg {
        T::arg(a)
    }
    fn get(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_one::<T>(id).cloned().map(Some)
    }
    fn show_default(&self) -> Option<String> {
        self.as_ref().map(T::show)
    }
    fn resolve(&mut self, base: &Path) {
        if let Some(v) = self {
            v.resolve(base)
        }
    }
}

/// Repeatable flags; the environment variable holds a comma-separated list.
impl<T: Scalar> Setting for Vec<T> {
    fn arg(a: Arg) -> Arg {
        a.value_parser(T::parser()).action(ArgAction::Append).value_delimiter(',').value_name(T::VALUE_NAME)
    }
    fn get(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_many::<T>(id).map(|v| v.cloned().collect())
    }
    fn show_default(&self) -> Option<String> {
        Some(self.iter().map(T::show).collect::<Vec<_>>().join(",")).filter(|s| !s.is_empty())
    }
    fn resolve(&mut self, base: &Path) {
        self.iter_mut().for_each(|v| v.resolve(base))
    }
}

/// The `--help` line of one setting: its doc comment joined into one paragraph, then its default.
pub fn help(doc: &[&str], default: Option<String>) -> String {
    let mut h = doc.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    if let Some(d) = default {
        h.push_str(&format!(" [default: {d}]"));
    }
    h
}

/// Builds the flag of one setting: `--NAME` (field name, `_` written `-`, unless given) and the
/// environment variable `DJINN_FIELD_NAME`.
pub fn flag<T: Setting>(id: &'static str, long: Option<&'static str>, doc: &[&str], default: &T) -> Arg {
    let long = long.map(str::to_owned).unwrap_or_else(|| id.replace('_', "-"));
    let env = format!("DJINN_{}", id.to_uppercase());
    T::arg(Arg::new(id).long(long).env(env).help(help(doc, default.show_default())))
}

/// Declares the server's settings once. Each entry is
/// `/// doc` `name: Type = default_expr`, optionally followed by `, flag = "long-name"` and
/// `, value = "PLACEHOLDER"`; entries end with `;`.
/// Generates `ServerConfig` (+ `Default`), `ServerConfigLayer` (every field optional; what a TOML
/// file deserializes into, and the clap `Args` of the flags) and `ServerConfigLayer::apply`.
#[macro_export]
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $ty:ty = $default:expr $(, flag = $flag:literal)? $(, value = $value:literal)?
    );* $(;)?) => {
        /// Everything `djinn-dataplane serve` needs to start. Field names are the TOML keys.
        #[derive(Clone, Debug, PartialEq)]
        pub struct ServerConfig {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for ServerConfig {
            fn default() -> Self {
                ServerConfig { $( $name: $default, )* }
            }
        }

        /// One layer of settings, each optional: a config file's keys, or the flags and
        /// environment variables. `apply` puts the given ones over a [`ServerConfig`].
        #[derive(Clone, Debug, Default, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct ServerConfigLayer {
            $( pub $name: Option<$ty>, )*
        }

        impl ServerConfigLayer {
            pub fn apply(self, c: &mut ServerConfig) {
                $( if let Some(v) = self.$name { c.$name = v; } )*
            }

            /// Relative paths resolve against `base` (the config file's folder).
            pub fn resolve_paths(&mut self, base: &std::path::Path) {
                $( if let Some(v) = &mut self.$name { $crate::settings::Setting::resolve(v, base); } )*
            }
        }

        impl clap::FromArgMatches for ServerConfigLayer {
            fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
                Ok(ServerConfigLayer {
                    $( $name: <$ty as $crate::settings::Setting>::get(m, stringify!($name)), )*
                })
            }
            fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
                $( if let Some(v) = <$ty as $crate::settings::Setting>::get(m, stringify!($name)) {
                    self.$name = Some(v);
                } )*
                Ok(())
            }
        }

        impl clap::Args for ServerConfigLayer {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                let d = ServerConfig::default();
                let mut cmd = cmd;
                $( if <$ty as $crate::settings::Setting>::FLAG {
                    cmd = cmd.arg($crate::settings::flag::<$ty>(
                        stringify!($name),
                        None $( .or(Some($flag)) )?,
                        &[$($doc),*],
                        &d.$name,
                    ) $( .value_name($value) )? );
                } )*
                cmd
            }
            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }
    };
}
