//! The configuration file and how the RAM budget is worked out.

use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use context_core::{Error, Result};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The environment variable that names a configuration file.
pub const CONFIG_ENV: &str = "WORKFLOW_CONTEXT_CONFIG";
/// The contexts directory's name under the temp dir when nothing else is set.
pub const DEFAULT_CONTEXTS_DIR_NAME: &str = "workflow_contexts";
/// The share of memory a context may use when nothing else is set.
pub const DEFAULT_MAX_RAM_PERCENT: f64 = 50.0;
const GIB: f64 = (1u64 << 30) as f64;
/// Config files are small; anything larger is a mistake.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The settings read from a configuration file.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FileConfig {
    pub(crate) source_name: String,
    pub(crate) max_ram_percent: Option<f64>,
    pub(crate) max_ram_gb: Option<f64>,
    pub(crate) contexts_dir_name: Option<String>,
}

fn config_err(source_name: &str, key: Option<&str>, message: impl Into<String>) -> Error {
    Error::Config { source_name: source_name.to_owned(), key: key.map(str::to_owned), message: message.into() }
}

impl FileConfig {
    /// Reads and checks the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<FileConfig> {
        let name = path.display().to_string();
        let file =
            std::fs::File::open(path).map_err(|e| config_err(&name, None, format!("cannot open the file: {e}")))?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| config_err(&name, None, format!("cannot read the file as UTF-8 text: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(config_err(&name, None, "the file is larger than 1 MiB"));
        }
        Self::parse(&text, &name)
    }

    /// Parses JSON text (with `//` and `/* */` comments) from `source_name`.
    pub(crate) fn parse(text: &str, source_name: &str) -> Result<FileConfig> {
        // Editors on Windows start UTF-8 files with a byte-order mark, which JSON forbids.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let stripped =
            json_comments::StripComments::with_settings(json_comments::CommentSettings::c_style(), text.as_bytes());
        let TopLevel(members) = serde_json::from_reader(stripped)
            .map_err(|e| config_err(source_name, None, format!("malformed JSON: {e}")))?;
        let Some(members) = members else {
            return Err(config_err(source_name, None, "the top level must be a JSON object"));
        };
        // Before any value is checked: which of a key's values was meant cannot be told.
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        if let Some((key, _)) = members.iter().find(|(key, _)| !seen.insert(key)) {
            return Err(config_err(source_name, Some(key), "is given more than once; give each key once"));
        }
        let mut cfg = FileConfig { source_name: source_name.to_owned(), ..FileConfig::default() };
        for (key, value) in &members {
            let err = |msg: String| config_err(source_name, Some(key), msg);
            match key.as_str() {
                // A known key set to null is unset; an unknown one is refused like any other.
                "MAX_RAM_PERCENT" | "MAX_RAM_GB" | "CONTEXTS_DIR_NAME" if value.is_null() => {}
                "MAX_RAM_PERCENT" => {
                    let p = value.as_f64().ok_or_else(|| err(format!("must be a number, not {value}")))?;
                    if !(1.0..=100.0).contains(&p) {
                        return Err(err(format!("must be between 1 and 100, not {p}")));
                    }
                    cfg.max_ram_percent = Some(p);
                }
                "MAX_RAM_GB" => {
                    let gb = value.as_f64().ok_or_else(|| err(format!("must be a number, not {value}")))?;
                    check_gb(gb).map_err(|m| err(m.to_owned()))?;
                    cfg.max_ram_gb = Some(gb);
                }
                "CONTEXTS_DIR_NAME" => {
                    let s = value.as_str().ok_or_else(|| err(format!("must be a string, not {value}")))?;
                    check_dir_name(s).map_err(|m| err(m.to_owned()))?;
                    cfg.contexts_dir_name = Some(s.to_owned());
                }
                _ => {
                    return Err(err(
                        "unknown key; the keys are MAX_RAM_PERCENT, MAX_RAM_GB and CONTEXTS_DIR_NAME".to_owned()
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// The contexts directory these settings select.
    pub(crate) fn contexts_dir(&self) -> PathBuf {
        let name = self.contexts_dir_name.as_deref().unwrap_or(DEFAULT_CONTEXTS_DIR_NAME);
        temp_dir().join(name)
    }
}

/// The temp directory: `TMPDIR`, unless it is unset or empty (as POSIX, `mktemp` and
/// Python's `tempfile` read it), else `/tmp`. (`std::env::temp_dir` takes an empty `TMPDIR`
/// for the working directory.)
fn temp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("/tmp"),
    }
}

/// The top level of a configuration file: its members in the file's order, duplicates
/// kept (a `serde_json` map keeps only the last value of a key given twice), or `None` if
/// it is not an object.
struct TopLevel(Option<Vec<(String, Value)>>);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<TopLevel, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(TopLevel(Some(members)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<TopLevel, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TopLevel(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
        }
        deserializer.deserialize_any(Members)
    }
}

/// Checks a RAM size in GiB.
pub(crate) fn check_gb(gb: f64) -> std::result::Result<(), &'static str> {
    if !gb.is_finite() {
        Err("must be a finite number")
    } else if gb < 0.0 {
        Err("must not be negative")
    } else if gb * GIB >= u64::MAX as f64 {
        Err("is larger than any machine's memory")
    } else {
        Ok(())
    }
}

/// Converts GiB to bytes (checked by [`check_gb`] first).
pub(crate) fn gb_to_bytes(gb: f64) -> u64 {
    (gb * GIB).round() as u64
}

fn check_dir_name(s: &str) -> std::result::Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.contains('\0') {
        return Err("must not contain a NUL character");
    }
    if Path::new(s).components().any(|c| matches!(c, Component::RootDir | Component::Prefix(_))) {
        return Err("must be a directory name under the temp directory, not an absolute path (a program picks \
                    another place with ContextBuilder::contexts_dir)");
    }
    if Path::new(s).components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err("must not contain '.' or '..' components");
    }
    Ok(())
}

/// The memory the machine (or its cgroup, where that is lower) has, in bytes; `None` when
/// that cannot be told (no `/proc/meminfo`, as in some sandboxes).
pub(crate) fn memory_limit() -> Option<u64> {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::everything())).ok()?;
    let total = sys.total_memory();
    let limit = match sys.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 && limits.total_memory < total => limits.total_memory,
        _ => total,
    };
    (limit > 0).then_some(limit)
}

/// The RAM budget from the file's two limits (the smaller holds) and the machine's memory.
///
/// # Errors
/// [`Error::Config`] naming `MAX_RAM_PERCENT` when the machine's memory is unknown and the
/// file sets no `MAX_RAM_GB`: a share of it cannot be worked out (and is not 0).
pub(crate) fn ram_budget(file: &FileConfig, memory: Option<u64>) -> Result<u64> {
    let percent = file.max_ram_percent.unwrap_or(DEFAULT_MAX_RAM_PERCENT);
    let by_gb = file.max_ram_gb.map(gb_to_bytes);
    let Some(memory) = memory else {
        return by_gb.ok_or_else(|| {
            config_err(
                &file.source_name,
                Some("MAX_RAM_PERCENT"),
                format!(
                    "cannot tell how much memory this machine has (is /proc mounted?), so not {percent} percent of \
                     it either: set MAX_RAM_GB, or ContextBuilder::max_ram_gb or max_ram_bytes"
                ),
            )
        });
    };
    let by_percent = (memory as f64 * percent / 100.0) as u64;
    Ok(by_gb.map_or(by_percent, |gb| by_percent.min(gb)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig> {
        FileConfig::parse(text, "test.json")
    }

    #[test]
    fn the_originals_example_with_comments_parses() {
        let cfg = parse(
            r#"{
    "MAX_RAM_PERCENT": 50,        // Use 50% of system RAM
    "MAX_RAM_GB": 16,             // Or limit to 16GB absolute
    "CONTEXTS_DIR_NAME": "contexts"  // Directory name for temp files
}"#,
        )
        .unwrap();
        assert_eq!(cfg.max_ram_percent, Some(50.0));
        assert_eq!(cfg.max_ram_gb, Some(16.0));
        assert_eq!(cfg.contexts_dir_name.as_deref(), Some("contexts"));
    }

    #[test]
    fn bad_files_name_the_key() {
        for (text, key) in [
            (r#"{"MAX_RAM_PERCENT": 0}"#, Some("MAX_RAM_PERCENT")),
            (r#"{"MAX_RAM_PERCENT": 101}"#, Some("MAX_RAM_PERCENT")),
            (r#"{"MAX_RAM_PERCENT": "50"}"#, Some("MAX_RAM_PERCENT")),
            (r#"{"MAX_RAM_GB": -1}"#, Some("MAX_RAM_GB")),
            (r#"{"MAX_RAM_GB": true}"#, Some("MAX_RAM_GB")),
            (r#"{"MAX_RAM_GB": 1e300}"#, Some("MAX_RAM_GB")),
            (r#"{"CONTEXTS_DIR_NAME": ".."}"#, Some("CONTEXTS_DIR_NAME")),
            (r#"{"CONTEXTS_DIR_NAME": "/etc/cron.d"}"#, Some("CONTEXTS_DIR_NAME")),
            (r#"{"CONTEXTS_DIR_NAME": ""}"#, Some("CONTEXTS_DIR_NAME")),
            (r#"{"CONTEXTS_DIR_NAME": 3}"#, Some("CONTEXTS_DIR_NAME")),
            (r#"{"MAX_RAM": 3}"#, Some("MAX_RAM")),
            (r#"{"MAX_RAM_GB": 3"#, None),
            (r#"[1, 2]"#, None),
            ("", None),
        ] {
            match parse(text) {
                Err(Error::Config { source_name, key: k, message }) => {
                    assert_eq!(source_name, "test.json");
                    assert_eq!(k.as_deref(), key, "{text}: {message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_not_read_as_its_last_value() {
        // serde_json keeps the last of duplicate keys: the first value, valid or not, would
        // vanish unseen.
        for text in [
            r#"{"MAX_RAM_GB": 1, "MAX_RAM_GB": 64}"#,
            r#"{"MAX_RAM_PERCENT": 0, "MAX_RAM_PERCENT": 50}"#,
            r#"{"CONTEXTS_DIR_NAME": "a", /* later */ "MAX_RAM_GB": 2, "CONTEXTS_DIR_NAME": "b"}"#,
            r#"{"MAX_RAM_GB": 1, "MAX_RAM_GB": null}"#,
        ] {
            match parse(text) {
                Err(Error::Config { key, message, .. }) => {
                    assert!(matches!(key.as_deref(), Some("MAX_RAM_GB" | "MAX_RAM_PERCENT" | "CONTEXTS_DIR_NAME")));
                    assert!(message.contains("more than once"), "{text}: {message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_byte_order_mark_is_read_past() {
        let cfg = parse("\u{feff}{\"MAX_RAM_GB\": 2}").unwrap();
        assert_eq!(cfg.max_ram_gb, Some(2.0));
        // Only at the start: anywhere else it is no whitespace JSON knows.
        assert!(matches!(parse("{\"MAX_RAM_GB\": 2}\u{feff}"), Err(Error::Config { .. })));
    }

    #[test]
    fn missing_file_is_a_config_error_naming_it() {
        let err = FileConfig::load(Path::new("/nonexistent/wfctx.json")).unwrap_err();
        assert!(
            matches!(err, Error::Config { ref source_name, .. } if source_name == "/nonexistent/wfctx.json"),
            "{err}"
        );
    }

    #[test]
    fn the_smaller_limit_holds() {
        let mem = Some(16u64 << 30);
        let mut cfg = FileConfig::default();
        assert_eq!(ram_budget(&cfg, mem).unwrap(), 8 << 30, "default 50 percent");
        cfg.max_ram_gb = Some(2.0);
        assert_eq!(ram_budget(&cfg, mem).unwrap(), 2 << 30);
        cfg.max_ram_percent = Some(10.0);
        assert_eq!(ram_budget(&cfg, mem).unwrap(), ((16u64 << 30) as f64 * 0.1) as u64);
        cfg.max_ram_gb = Some(100.0);
        assert_eq!(ram_budget(&cfg, mem).unwrap(), ((16u64 << 30) as f64 * 0.1) as u64);
    }

    #[test]
    fn an_unknown_memory_leaves_only_max_ram_gb() {
        let mut cfg = FileConfig { source_name: "test.json".into(), ..FileConfig::default() };
        match ram_budget(&cfg, None) {
            Err(Error::Config { source_name, key, .. }) => {
                assert_eq!((source_name.as_str(), key.as_deref()), ("test.json", Some("MAX_RAM_PERCENT")));
            }
            other => panic!("{other:?}"),
        }
        cfg.max_ram_gb = Some(2.0);
        assert_eq!(ram_budget(&cfg, None).unwrap(), 2 << 30);
    }

    #[test]
    fn memory_limit_is_plausible() {
        assert!(memory_limit().is_some_and(|m| m > 64 << 20));
    }
}
