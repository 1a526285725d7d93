//! Device declarations: `--device NAME=KIND[:ARG]` and manifest `[[device]]` entries.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Devices one picoprocess may be granted.
pub const MAX_DEVICES: usize = 8;

/// Longest accepted device name, in characters.
const MAX_NAME_LEN: usize = 32;

/// The kinds of device a picoprocess can be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A 16550 UART on 8 I/O ports (`uart`). Takes no argument.
    Uart,
    /// A virtio-mmio block device (`virtio-blk`). Needs a backing file.
    VirtioBlk,
    /// A virtio-mmio network device (`virtio-net`). Takes no argument: its
    /// wire is an open TAP descriptor the embedder hands over
    /// (`moat_monitor::Sandbox::device_file`; `moat serve --nic --host kvm`
    /// does).
    VirtioNet,
}

impl DeviceKind {
    /// Every kind, in the order they are listed in error messages.
    pub const ALL: [DeviceKind; 3] = [
        DeviceKind::Uart,
        DeviceKind::VirtioBlk,
        DeviceKind::VirtioNet,
    ];

    /// The kind's name as written in a declaration (`uart`, `virtio-blk`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Uart => "uart",
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::VirtioNet => "virtio-net",
        }
    }

    /// Looks a kind up by its declared name; `None` if there is no such kind.
    pub fn from_name(name: &str) -> Option<DeviceKind> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether a device of this kind needs a backing file.
    pub fn needs_backing(self) -> bool {
        matches!(self, DeviceKind::VirtioBlk)
    }

    /// Whether a device of this kind needs a descriptor handed over by
    /// the embedder (its wire), rather than a file the monitor opens.
    pub fn needs_passed_file(self) -> bool {
        matches!(self, DeviceKind::VirtioNet)
    }

    /// Whether a device of this kind may be handed a descriptor by the
    /// embedder: a virtio-net device's wire, a UART's line (instead of the
    /// console).
    pub fn takes_passed_file(self) -> bool {
        matches!(self, DeviceKind::VirtioNet | DeviceKind::Uart)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device declaration, from `--device NAME=KIND[:ARG]` or a manifest
/// `[[device]]` entry, validated.
///
/// Serialized as a [`ManifestDevice`] (`name`, `kind`, `file`), and
/// deserialized from one with the same validation as [`DeviceSpec::parse`],
/// so a manifest can hold `DeviceSpec`s directly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ManifestDevice", into = "ManifestDevice")]
pub struct DeviceSpec {
    /// The device's name: 1 to 32 characters of `[a-z0-9_-]`, starting with a letter.
    pub name: String,
    /// What the device is.
    pub kind: DeviceKind,
    /// The host file behind the device (`Some` exactly for kinds that need one).
    pub backing: Option<PathBuf>,
    /// The guest may read the backing file but not write it (`,ro` on the
    /// command line, `read_only = true` in a manifest; backed kinds only).
    /// The file is opened read-only and the device says it is read-only.
    pub read_only: bool,
}

impl DeviceSpec {
    /// Parses a command-line declaration: `com1=uart`,
    /// `blk0=virtio-blk:/path/disk.img`, `blk0=virtio-blk,ro:disk.img`.
    ///
    /// Everything after the first `:` is the argument, so paths may contain
    /// `:`; options follow the kind after commas (`ro`: read-only).
    pub fn parse(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        let Some((name, rest)) = s.split_once('=') else {
            return Err(DeviceSpecError::Syntax {
                input: s.to_owned(),
            });
        };
        let (kind, arg) = match rest.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg.to_owned())),
            None => (rest, None),
        };
        let mut opts = kind.split(',');
        let kind = opts.next().unwrap_or_default();
        let mut read_only = false;
        for o in opts {
            match o {
                "ro" => read_only = true,
                other => {
                    return Err(DeviceSpecError::UnknownOption {
                        name: name.to_owned(),
                        option: other.to_owned(),
                    })
                }
            }
        }
        build(name, kind, arg, read_only, SpecForm::CommandLine)
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        DeviceSpec::parse(s)
    }
}

/// Renders the command-line form, which [`DeviceSpec::parse`] reads back.
impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.kind)?;
        if self.read_only {
            write!(f, ",ro")?;
        }
        if let Some(path) = &self.backing {
            write!(f, ":{}", path.display())?;
        }
        Ok(())
    }
}

/// A `[[device]]` entry of a picoprocess manifest, as written:
///
/// ```toml
/// [[device]]
/// name = "blk0"
/// kind = "virtio-blk"
/// file = "disk.img"
/// ```
///
/// Convert it with `DeviceSpec::try_from`, which applies the same validation
/// as [`DeviceSpec::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDevice {
    /// The device's name.
    pub name: String,
    /// The device's kind (`uart`, `virtio-blk`).
    pub kind: String,
    /// The backing file, for kinds that need one. (Always serialised: the
    /// monitor sends devices to the VMM in postcard, which is not
    /// self-describing.)
    #[serde(default)]
    pub file: Option<String>,
    /// Serve the backing file read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl TryFrom<ManifestDevice> for DeviceSpec {
    type Error = DeviceSpecError;

    fn try_from(m: ManifestDevice) -> Result<DeviceSpec, DeviceSpecError> {
        build(&m.name, &m.kind, m.file, m.read_only, SpecForm::Manifest)
    }
}

impl From<DeviceSpec> for ManifestDevice {
    fn from(spec: DeviceSpec) -> ManifestDevice {
        ManifestDevice {
            name: spec.name,
            kind: spec.kind.as_str().to_owned(),
            file: spec.backing.map(|p| p.to_string_lossy().into_owned()),
            read_only: spec.read_only,
        }
    }
}

/// Checks that no two declarations share a name.
pub fn check_unique_names(specs: &[DeviceSpec]) -> Result<(), DeviceSpecError> {
    let mut seen = HashSet::new();
    for spec in specs {
        if !seen.insert(spec.name.as_str()) {
            return Err(DeviceSpecError::DuplicateName {
                name: spec.name.clone(),
            });
        }
    }
    Ok(())
}

fn build(
    name: &str,
    kind: &str,
    arg: Option<String>,
    read_only: bool,
    form: SpecForm,
) -> Result<DeviceSpec, DeviceSpecError> {
    check_name(name)?;
    let Some(k) = DeviceKind::from_name(kind) else {
        return Err(DeviceSpecError::UnknownKind {
            name: name.to_owned(),
            kind: kind.to_owned(),
        });
    };
    let backing = match (k.needs_backing(), arg) {
        (true, Some(path)) if !path.is_empty() => Some(PathBuf::from(path)),
        (true, _) => {
            return Err(DeviceSpecError::MissingBacking {
                name: name.to_owned(),
                kind: k,
                form,
            })
        }
        (false, None) => None,
        (false, Some(arg)) => {
            return Err(DeviceSpecError::UnexpectedArgument {
                name: name.to_owned(),
                kind: k,
                arg,
                form,
            })
        }
    };
    if read_only && backing.is_none() {
        return Err(DeviceSpecError::UnknownOption {
            name: name.to_owned(),
            option: "ro (only devices with a backing file can be read-only)".to_owned(),
        });
    }
    Ok(DeviceSpec {
        name: name.to_owned(),
        kind: k,
        backing,
        read_only,
    })
}

fn check_name(name: &str) -> Result<(), DeviceSpecError> {
    let len = name.chars().count();
    let err = |problem| DeviceSpecError::BadName {
        name: name.to_owned(),
        problem,
    };
    let Some(first) = name.chars().next() else {
        return Err(err(NameProblem::Empty));
    };
    if len > MAX_NAME_LEN {
        return Err(err(NameProblem::TooLong(len)));
    }
    if !first.is_ascii_lowercase() {
        return Err(err(NameProblem::BadStart(first)));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(err(NameProblem::BadChar(c)));
    }
    Ok(())
}

/// Where a declaration came from; decides how an error tells the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecForm {
    /// `--device NAME=KIND[:ARG]`.
    CommandLine,
    /// A manifest `[[device]]` entry.
    Manifest,
}

/// What is wrong with a device name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// The name has this many characters, more than 32.
    TooLong(usize),
    /// The name starts with this character, not a lowercase letter.
    BadStart(char),
    /// The name contains this character, outside `[a-z0-9_-]`.
    BadChar(char),
}

/// A device declaration that was rejected. Its message says what was wrong
/// and how to write it instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceSpecError {
    /// The command-line form is not `NAME=KIND[:ARG]`.
    Syntax {
        /// The declaration as given.
        input: String,
    },
    /// The name breaks the naming rule.
    BadName {
        /// The name as given.
        name: String,
        /// Which part of the rule it breaks.
        problem: NameProblem,
    },
    /// The kind is not one of [`DeviceKind::ALL`].
    UnknownKind {
        /// The device's name.
        name: String,
        /// The kind as given.
        kind: String,
    },
    /// A kind that needs a backing file was declared without one.
    MissingBacking {
        /// The device's name.
        name: String,
        /// The device's kind.
        kind: DeviceKind,
        /// Where the declaration came from.
        form: SpecForm,
    },
    /// A kind that takes no argument was given one.
    UnexpectedArgument {
        /// The device's name.
        name: String,
        /// The device's kind.
        kind: DeviceKind,
        /// The argument as given.
        arg: String,
        /// Where the declaration came from.
        form: SpecForm,
    },
    /// An option after the kind that is not known (or not for this kind).
    UnknownOption {
        /// The device's name.
        name: String,
        /// The option as given.
        option: String,
    },
    /// Two declarations share a name.
    DuplicateName {
        /// The repeated name.
        name: String,
    },
}

const NAME_RULE: &str =
    "device names are 1 to 32 characters of a-z, 0-9, `_` and `-`, starting with a letter (e.g. `com1`, `blk0`)";

fn known_kinds() -> String {
    DeviceKind::ALL
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for DeviceSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpecError::Syntax { input } => write!(
                f,
                "invalid device declaration `{input}`: expected NAME=KIND[:ARG], \
                 e.g. `com1=uart` or `blk0=virtio-blk:disk.img`"
            ),
            DeviceSpecError::BadName { name, problem } => match problem {
                NameProblem::Empty => write!(f, "device name is empty: {NAME_RULE}"),
                NameProblem::TooLong(n) => write!(
                    f,
                    "device name `{name}` is {n} characters long, more than {MAX_NAME_LEN}: {NAME_RULE}"
                ),
                NameProblem::BadStart(c) => write!(
                    f,
                    "device name `{name}` starts with {c:?}, not a lowercase letter: {NAME_RULE}"
                ),
                NameProblem::BadChar(c) => write!(
                    f,
                    "device name `{name}` contains {c:?}: {NAME_RULE}"
                ),
            },
            DeviceSpecError::UnknownKind { name, kind } if kind.is_empty() => write!(
                f,
                "device `{name}` has no kind: write one of {} after `{name}=`",
                known_kinds()
            ),
            DeviceSpecError::UnknownKind { name, kind } => write!(
                f,
                "device `{name}` has unknown kind `{kind}`; known kinds: {}",
                known_kinds()
            ),
            DeviceSpecError::MissingBacking { name, kind, form } => match form {
                SpecForm::CommandLine => write!(
                    f,
                    "device `{name}` of kind {kind} needs a backing file: {name}={kind}:PATH"
                ),
                SpecForm::Manifest => write!(
                    f,
                    "device `{name}` of kind {kind} needs a backing file: \
                     add `file = \"PATH\"` to its [[device]] entry"
                ),
            },
            DeviceSpecError::UnexpectedArgument {
                name,
                kind,
                arg,
                form,
            } => match form {
                SpecForm::CommandLine => write!(
                    f,
                    "device `{name}` of kind {kind} takes no argument (got `{arg}`): write {name}={kind}"
                ),
                SpecForm::Manifest => write!(
                    f,
                    "device `{name}` of kind {kind} takes no backing file (got `{arg}`): \
                     remove `file` from its [[device]] entry"
                ),
            },
            DeviceSpecError::UnknownOption { name, option } => write!(
                f,
                "device `{name}`: unknown option `{option}`; the one option is `ro` \
                 (read-only), as in `{name}=virtio-blk,ro:disk.img`"
            ),
            DeviceSpecError::DuplicateName { name } => write!(
                f,
                "device name `{name}` is declared more than once: give each device its own name"
            ),
        }
    }
}

impl std::error::Error for DeviceSpecError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        DeviceSpec::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_uart() {
        let spec = DeviceSpec::parse("com1=uart").unwrap();
        assert_eq!(
            spec,
            DeviceSpec {
                name: "com1".into(),
                kind: DeviceKind::Uart,
                backing: None,
                read_only: false,
            }
        );
        assert_eq!(spec.to_string(), "com1=uart");
    }

    #[test]
    fn parses_virtio_blk_with_colons_in_path() {
        let spec = DeviceSpec::parse("blk0=virtio-blk:/path/disk.img").unwrap();
        assert_eq!(spec.kind, DeviceKind::VirtioBlk);
        assert_eq!(spec.backing, Some(PathBuf::from("/path/disk.img")));
        let spec: DeviceSpec = "b_1-x=virtio-blk:/a:b/c".parse().unwrap();
        assert_eq!(spec.name, "b_1-x");
        assert_eq!(spec.backing, Some(PathBuf::from("/a:b/c")));
        assert_eq!(DeviceSpec::parse(&spec.to_string()).unwrap(), spec);
        assert!(!spec.read_only);
    }

    #[test]
    fn read_only_option() {
        let spec = DeviceSpec::parse("blk0=virtio-blk,ro:/a:b").unwrap();
        assert!(spec.read_only);
        assert_eq!(spec.backing, Some(PathBuf::from("/a:b")));
        assert_eq!(spec.to_string(), "blk0=virtio-blk,ro:/a:b");
        assert_eq!(DeviceSpec::parse(&spec.to_string()).unwrap(), spec);
        let e = err("blk0=virtio-blk,rw:/a");
        assert!(e.contains("unknown option `rw`"), "{e}");
        let e = err("com1=uart,ro");
        assert!(e.contains("backing file"), "{e}");
        let m: DeviceSpec = toml::from_str(
            "name = \"blk0\"\nkind = \"virtio-blk\"\nfile = \"d.img\"\nread_only = true\n",
        )
        .unwrap();
        assert!(m.read_only);
    }

    #[test]
    fn syntax_error() {
        let e = err("com1");
        assert!(e.contains("expected NAME=KIND[:ARG]"), "{e}");
        assert!(e.contains("`com1`"), "{e}");
    }

    #[test]
    fn name_errors() {
        let e = err("=uart");
        assert!(e.starts_with("device name is empty"), "{e}");
        let long = "a".repeat(33);
        let e = err(&format!("{long}=uart"));
        assert!(e.contains("33 characters long, more than 32"), "{e}");
        assert!(DeviceSpec::parse(&format!("{}=uart", "a".repeat(32))).is_ok());
        let e = err("1com=uart");
        assert!(e.contains("starts with '1', not a lowercase letter"), "{e}");
        let e = err("Com1=uart");
        assert!(e.contains("starts with 'C'"), "{e}");
        let e = err("com.1=uart");
        assert!(e.contains("contains '.'"), "{e}");
        assert!(e.contains("a-z, 0-9, `_` and `-`"), "{e}");
        let e = err("com 1=uart");
        assert!(e.contains("contains ' '"), "{e}");
    }

    #[test]
    fn unknown_kind_lists_known_kinds() {
        let e = err("com1=serial");
        assert_eq!(
            e,
            "device `com1` has unknown kind `serial`; known kinds: `uart`, `virtio-blk`, `virtio-net`"
        );
        let e = err("com1=");
        assert!(e.contains("has no kind"), "{e}");
        assert!(e.contains("`uart`, `virtio-blk`, `virtio-net`"), "{e}");
        // Kinds are case-sensitive.
        assert!(err("com1=UART").contains("unknown kind `UART`"));
    }

    #[test]
    fn virtio_blk_needs_backing() {
        let want = "device `blk0` of kind virtio-blk needs a backing file: blk0=virtio-blk:PATH";
        assert_eq!(err("blk0=virtio-blk"), want);
        assert_eq!(err("blk0=virtio-blk:"), want);
    }

    #[test]
    fn uart_takes_no_argument() {
        let e = err("com1=uart:115200");
        assert_eq!(
            e,
            "device `com1` of kind uart takes no argument (got `115200`): write com1=uart"
        );
        assert!(err("com1=uart:").contains("takes no argument"));
    }

    #[test]
    fn manifest_form() {
        let m = ManifestDevice {
            name: "blk0".into(),
            kind: "virtio-blk".into(),
            file: Some("disk.img".into()),
            read_only: false,
        };
        let spec = DeviceSpec::try_from(m.clone()).unwrap();
        assert_eq!(spec.backing, Some(PathBuf::from("disk.img")));
        assert_eq!(ManifestDevice::from(spec), m);

        let e = DeviceSpec::try_from(ManifestDevice {
            name: "blk0".into(),
            kind: "virtio-blk".into(),
            file: None,
            read_only: false,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("needs a backing file"), "{e}");
        assert!(e.contains("file = \"PATH\""), "{e}");

        let e = DeviceSpec::try_from(ManifestDevice {
            name: "com1".into(),
            kind: "uart".into(),
            file: Some("x".into()),
            read_only: false,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("takes no backing file"), "{e}");

        let e = DeviceSpec::try_from(ManifestDevice {
            name: "Bad".into(),
            kind: "uart".into(),
            file: None,
            read_only: false,
        })
        .unwrap_err();
        assert!(matches!(e, DeviceSpecError::BadName { .. }));
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct Manifest {
        device: Vec<DeviceSpec>,
    }

    #[test]
    fn toml_manifest_round_trip() {
        let text = r#"
            [[device]]
            name = "com1"
            kind = "uart"

            [[device]]
            name = "blk0"
            kind = "virtio-blk"
            file = "/var/disk.img"
        "#;
        let m: Manifest = toml::from_str(text).unwrap();
        assert_eq!(m.device[0], DeviceSpec::parse("com1=uart").unwrap());
        assert_eq!(
            m.device[1],
            DeviceSpec::parse("blk0=virtio-blk:/var/disk.img").unwrap()
        );
        check_unique_names(&m.device).unwrap();
        let again: Manifest = toml::from_str(&toml::to_string(&m).unwrap()).unwrap();
        assert_eq!(again.device, m.device);
    }

    #[test]
    fn toml_manifest_errors() {
        let bad_field = r#"
            [[device]]
            name = "com1"
            kind = "uart"
            irq = 4
        "#;
        let e = toml::from_str::<Manifest>(bad_field)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `irq`"), "{e}");

        let missing = r#"
            [[device]]
            name = "blk0"
            kind = "virtio-blk"
        "#;
        let e = toml::from_str::<Manifest>(missing).unwrap_err().to_string();
        assert!(e.contains("needs a backing file"), "{e}");

        let kind = r#"
            [[device]]
            name = "nic0"
            kind = "e1000"
        "#;
        let e = toml::from_str::<Manifest>(kind).unwrap_err().to_string();
        assert!(
            e.contains("known kinds: `uart`, `virtio-blk`, `virtio-net`"),
            "{e}"
        );
        // A virtio-net device takes no file: its wire is handed over.
        let net = r#"
            [[device]]
            name = "net0"
            kind = "virtio-net"
            file = "disk.img"
        "#;
        assert!(toml::from_str::<Manifest>(net).is_err());
    }

    #[test]
    fn duplicate_names() {
        let specs = [
            DeviceSpec::parse("com1=uart").unwrap(),
            DeviceSpec::parse("com1=virtio-blk:x").unwrap(),
        ];
        let e = check_unique_names(&specs).unwrap_err();
        assert_eq!(
            e,
            DeviceSpecError::DuplicateName {
                name: "com1".into()
            }
        );
        assert!(e.to_string().contains("more than once"));
    }

    #[test]
    fn kind_serde_names() {
        assert_eq!(
            DeviceKind::from_name("virtio-blk"),
            Some(DeviceKind::VirtioBlk)
        );
        assert_eq!(DeviceKind::from_name("uart"), Some(DeviceKind::Uart));
        assert_eq!(DeviceKind::from_name("virtio_blk"), None);
    }
}
