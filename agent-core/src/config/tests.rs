//! Tests of the allow-list: the example file, every value form, every error with its line,
//! capacities, argument checks, argv substitution and the wire listing.

use std::boxed::Box;
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use ring_protocol::message::{ArgProblem, ParamKind, ParamSpec, Rejection};

use super::*;

type Kind = ConfigErrorKind;

const EXAMPLE: &str = include_str!("../../../examples/allow-list.toml");

fn parse(text: &str) -> Box<Config> {
    let mut config = Box::new(Config::new());
    if let Err(e) = config.load(text) {
        panic!("{e}\n--- text ---\n{text}");
    }
    config
}

fn error(text: &str) -> (u32, Kind) {
    let mut config = Box::new(Config::new());
    match config.load(text) {
        Ok(()) => panic!("loaded but should not have:\n{text}"),
        Err(e) => {
            assert_eq!(
                *config,
                Config::new(),
                "a failed load leaves the config empty"
            );
            (e.line, e.kind)
        }
    }
}

fn snip(s: &str) -> Snippet {
    Snippet::new(s)
}

fn argv(command: CommandSpec<'_>, args: &[&str]) -> Vec<String> {
    command.argv(args).map(ToString::to_string).collect()
}

fn invalid(index: u8, problem: ArgProblem) -> Result<(), Rejection> {
    Err(Rejection::InvalidArgument { index, problem })
}

/// A minimal command with `extra` appended to its table.
fn command(extra: &str) -> String {
    format!("[[command]]\nname = \"c\"\nprogram = \"/bin/c\"\n{extra}")
}

// --- The example ---

#[test]
fn example_allow_list() {
    let config = parse(EXAMPLE);
    let names: Vec<_> = config.commands().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "uname",
            "uptime",
            "df",
            "sleep",
            "fail",
            "service-status",
            "journal",
            "id"
        ]
    );
    assert_eq!(config.command_count(), 8);

    let agent = config.agent_settings();
    assert_eq!(agent.max_running, 8);
    assert_eq!(agent.kill_grace_ms, 2000);
    assert_eq!(agent.default_timeout_ms, 60_000);
    assert_eq!(agent.default_max_output, 1 << 20);

    let push = config.push_settings();
    assert!(!push.enabled);
    assert_eq!(push.max_bytes, 4 << 20);
    assert_eq!(push.dir, "/var/lib/portless-agent/push");
    assert_eq!(push.timeout_ms, 300_000);
    assert_eq!(push.user, Some(Principal::Name("nobody")));
    assert_eq!(push.group, Some(Principal::Name("nogroup")));

    let uname = config.command("uname").unwrap();
    assert_eq!(uname.description(), "Print system information");
    assert_eq!(argv(uname, &[]), ["/bin/uname", "-a"]);
    assert_eq!(uname.timeout_ms(), 5000);
    assert_eq!(uname.max_output(), 65536);
    assert_eq!(uname.user(), Some(Principal::Name("nobody")));
    assert_eq!(uname.group(), Some(Principal::Id(65534)));
    assert_eq!(uname.env().collect::<Vec<_>>(), ["LANG=C"]);
    assert_eq!(uname.check_args(&[]), Ok(()));
    assert_eq!(uname.check_args(&["x"]), invalid(0, ArgProblem::Unexpected));

    let uptime = config.command("uptime").unwrap();
    assert_eq!(argv(uptime, &[]), ["/usr/bin/uptime"]);
    assert_eq!(uptime.max_output(), 1 << 20, "the [agent] default");

    let df = config.command("df").unwrap();
    assert_eq!(
        argv(df, &[]),
        ["/bin/df", "-h", "-x", "tmpfs", "-x", "devtmpfs"]
    );
    assert_eq!(df.cwd(), Some("/"));

    let sleep = config.command("sleep").unwrap();
    assert_eq!(argv(sleep, &["5"]), ["/bin/sleep", "5"]);
    assert_eq!(sleep.timeout_ms(), 0);
    assert_eq!(
        sleep.params().collect::<Vec<_>>(),
        [ParamSpec {
            name: "seconds",
            kind: ParamKind::Integer { min: 1, max: 3600 }
        }]
    );
    assert_eq!(sleep.check_args(&["3600"]), Ok(()));
    assert_eq!(sleep.check_args(&["0"]), invalid(0, ArgProblem::OutOfRange));
    assert_eq!(sleep.check_args(&[]), invalid(0, ArgProblem::Missing));

    let fail = config.command("fail").unwrap();
    assert_eq!(
        argv(fail, &[]),
        ["/bin/sh", "-c", "echo failing >&2; exit 3"]
    );

    let status = config.command("service-status").unwrap();
    assert_eq!(
        status.info().params[0].kind,
        ParamKind::OneOf {
            choices: "nginx.service|sshd.service|portless-agent.service"
        }
    );
    assert_eq!(
        argv(status, &["sshd.service"]),
        [
            "/bin/systemctl",
            "status",
            "--no-pager",
            "--lines=20",
            "--",
            "sshd.service"
        ]
    );
    assert_eq!(
        status.check_args(&["sshd"]),
        invalid(0, ArgProblem::NotAChoice)
    );
    assert_eq!(status.user(), None);

    let journal = config.command("journal").unwrap();
    assert_eq!(journal.check_args(&["nginx.service", "50"]), Ok(()));
    assert_eq!(
        journal.check_args(&["nginx.service", "050"]),
        invalid(1, ArgProblem::NotInteger)
    );
    assert_eq!(
        argv(journal, &["nginx.service", "50"])[3..],
        ["--unit", "nginx.service", "--lines", "50"]
    );

    let id = config.command("id").unwrap();
    assert_eq!(argv(id, &["www-data"]), ["/usr/bin/id", "--", "www-data"]);
    assert_eq!(id.check_args(&["root"]), Ok(()));
    assert_eq!(
        id.check_args(&["Root"]),
        invalid(0, ArgProblem::BadCharacter)
    );
    assert_eq!(id.check_args(&[""]), invalid(0, ArgProblem::BadLength));
}

#[test]
fn debug_output_is_readable() {
    let config = parse(EXAMPLE);
    let uname = format!("{:?}", config.command("uname").unwrap());
    assert!(uname.starts_with("CommandSpec { name: \"uname\", description: \"Print system information\", program: \"/bin/uname\", args: [Literal(\"-a\")]"), "{uname}");
    let all = format!("{config:?}");
    assert!(all.contains("max_running: 8"), "{all}");
    assert!(all.contains("name: \"service-status\""), "{all}");
    let mut rest = config.commands();
    rest.nth(5);
    assert_eq!(format!("{rest:?}"), "[\"journal\", \"id\"]");
}

#[test]
fn config_is_a_fixed_size_value() {
    let size = core::mem::size_of::<Config>();
    assert!(size < 80 * 1024, "Config is {size} bytes");
    assert!(size > ARENA_BYTES);
}

// --- Values and lexical forms ---

#[test]
fn empty_file_gives_defaults() {
    for text in ["", "\n\n", "# only a comment", "  \t\r\n# x\r\n"] {
        let config = parse(text);
        assert_eq!(config.command_count(), 0);
        assert_eq!(config.agent_settings(), AgentSettings::DEFAULT);
        let push = config.push_settings();
        assert!(!push.enabled);
        assert_eq!(push.max_bytes, DEFAULT_PUSH_MAX_BYTES);
        assert_eq!(push.dir, DEFAULT_PUSH_DIR);
        assert_eq!(push.timeout_ms, DEFAULT_PUSH_TIMEOUT_MS);
        assert_eq!((push.user, push.group), (None, None));
        assert_eq!(config.arena_used(), 0);
    }
    assert_eq!(*parse(""), Config::default());
}

#[test]
fn every_value_form() {
    let config = parse(
        r#"
[agent]
max_running = +16
kill_grace_ms = 0
default_timeout_ms = 4_294_967_295
default_max_output = 9_223_372_036_854_775_807

[push]
enabled = true
max_bytes = 1
dir = '/srv/push'
timeout_ms = 0
user = 0
group = "wheel"

[[command]]
name = "all-forms_1.0"
description = "tab\there, quote \" backslash \\ \u00e9 \U0001F600 \b\f\r\n"
program = '/opt/bin/C:\literal'
args = [
  "basic",   # a comment after an element
  'literal \n stays',
  # a comment on its own line

  "",
  "{p}",
]
timeout_ms = 7
max_output = 0
user = 4294967294
group = "_grp.x-1"
cwd = "/tmp"
env = ['A=1', "_B=x=y", "C="]

[[command.param]]
name = "p"
kind = "integer"
min = -9223372036854775808
max = 9223372036854775807
"#,
    );
    let agent = config.agent_settings();
    assert_eq!(agent.max_running, 16);
    assert_eq!(agent.kill_grace_ms, 0);
    assert_eq!(agent.default_timeout_ms, u32::MAX);
    assert_eq!(agent.default_max_output, i64::MAX as u64);
    let push = config.push_settings();
    assert!(push.enabled);
    assert_eq!(push.max_bytes, 1);
    assert_eq!(push.dir, "/srv/push");
    assert_eq!(push.timeout_ms, 0);
    assert_eq!(push.user, Some(Principal::Id(0)));
    assert_eq!(push.group, Some(Principal::Name("wheel")));

    let c = config.command("all-forms_1.0").unwrap();
    assert_eq!(
        c.description(),
        "tab\there, quote \" backslash \\ é 😀 \u{8}\u{c}\r\n"
    );
    assert_eq!(c.program(), r"/opt/bin/C:\literal");
    assert_eq!(
        c.args().collect::<Vec<_>>(),
        [
            ArgTemplate::Literal("basic"),
            ArgTemplate::Literal(r"literal \n stays"),
            ArgTemplate::Literal(""),
            ArgTemplate::Param {
                index: 0,
                name: "p"
            },
        ]
    );
    assert_eq!(c.timeout_ms(), 7);
    assert_eq!(c.max_output(), 0);
    assert_eq!(c.user(), Some(Principal::Id(u32::MAX - 1)));
    assert_eq!(c.group(), Some(Principal::Name("_grp.x-1")));
    assert_eq!(c.cwd(), Some("/tmp"));
    assert_eq!(c.env().collect::<Vec<_>>(), ["A=1", "_B=x=y", "C="]);
    assert_eq!(
        c.check_args(&["-9223372036854775808"]),
        Ok(()),
        "i64::MIN is in range"
    );
    assert_eq!(
        c.check_args(&["9223372036854775808"]),
        invalid(0, ArgProblem::OutOfRange)
    );
}

#[test]
fn crlf_and_header_whitespace() {
    let text = "[ agent ]\r\nmax_running = 2 # two\r\n\r\n[[ command ]]\r\nname = \"x\"\r\nprogram = \"/x\"\r\nargs = [\r\n  \"{a}\", # c\r\n]\r\n[[ command . param ]]\r\nname = \"a\"\r\nkind = \"choice\"\r\nchoices = [\"p\", \"q\"]\r\n";
    let config = parse(text);
    assert_eq!(config.agent_settings().max_running, 2);
    let x = config.command("x").unwrap();
    assert_eq!(argv(x, &["q"]), ["/x", "q"]);
    // Lines are counted across CRLF.
    let (line, kind) = error(&text.replace("choices = [\"p\", \"q\"]", "choices = 1"));
    assert_eq!(
        (line, kind),
        (13, wrong("choices", ValueType::Array, ValueType::Integer))
    );
}

#[test]
fn tables_in_any_order_and_params_after_other_tables() {
    // TOML gives a [[command.param]] to the last [[command]], even after [agent].
    let config = parse(
        r#"
[[command]]
name = "a"
program = "/a"
args = ["{n}"]

[agent]
max_running = 3

[[command.param]]
name = "n"
kind = "integer"
min = 0
max = 9

[push]
enabled = true
"#,
    );
    assert_eq!(config.agent_settings().max_running, 3);
    assert!(config.push_settings().enabled);
    assert_eq!(config.command("a").unwrap().param_count(), 1);
}

#[test]
fn placeholders_are_whole_elements_only() {
    let config = parse(&format!(
        "{}{}",
        command(concat!(
            r#"args = ["x{a}", "{a}", "{}", "{print $1}", "{A}", "{a", "a}", "{{a}}"]"#,
            "\n"
        )),
        "[[command.param]]\nname = \"a\"\nkind = \"string\"\ncharset = \"a-z\"\nmax_len = 5\n"
    ));
    let c = config.command("c").unwrap();
    assert_eq!(
        argv(c, &["val"]),
        [
            "/bin/c",
            "x{a}",
            "val",
            "{}",
            "{print $1}",
            "{A}",
            "{a",
            "a}",
            "{{a}}"
        ]
    );
}

#[test]
fn reload_replaces_everything() {
    let mut config = parse(EXAMPLE);
    config
        .load("[agent]\nmax_running = 1\n[[command]]\nname = \"only\"\nprogram = \"/o\"")
        .unwrap();
    assert_eq!(config.command_count(), 1);
    assert!(config.command("uname").is_none());
    assert_eq!(config.push_settings().user, None);
    assert_eq!(config.agent_settings().max_running, 1);
    assert!(config.load("[agent]\nbogus = 1").is_err());
    assert_eq!(config.command_count(), 0);
    assert_eq!(*config, Config::new());
}

#[test]
fn parse_by_value() {
    let config = Config::parse("[[command]]\nname = \"v\"\nprogram = \"/v\"").unwrap();
    assert_eq!(config.commands().next().unwrap().name(), "v");
    let e = Config::parse("[agent]\nmax_running = 0").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn commands_iterate_and_index() {
    let config = parse(EXAMPLE);
    let mut commands = config.commands();
    assert_eq!(commands.len(), 8);
    assert_eq!(commands.get(3).unwrap().name(), "sleep");
    assert_eq!(commands.next().unwrap().name(), "uname");
    assert_eq!(commands.get(0).unwrap().name(), "uptime");
    assert_eq!(commands.next_back().unwrap().name(), "id");
    assert_eq!(commands.len(), 6);
    assert!(commands.get(6).is_none());
    assert!(config.command("nope").is_none());
    assert!(config.command("").is_none());
}

// --- Errors, each with its line ---

fn wrong(key: &'static str, expected: ValueType, found: ValueType) -> Kind {
    Kind::WrongType {
        key,
        expected,
        found,
    }
}

#[test]
fn lexical_errors_through_the_loader() {
    let cases: &[(&str, u32, Kind)] = &[
        ("\n[agent]\nmax_running = 1\rx", 3, Kind::ControlCharacter),
        ("[[command]]\nname = \"a\u{1}\"", 2, Kind::ControlCharacter),
        ("[[command]]\nname = \"a\\u0000\"", 2, Kind::NulCharacter),
        ("[[command]]\n\nname = \"a\\q\"", 3, Kind::InvalidEscape),
        ("[[command]]\nname = \"a", 2, Kind::UnterminatedString),
        (
            "[[command]]\nargs = [\"a\",\n\"b\"\n",
            2,
            Kind::UnterminatedArray,
        ),
        ("[[command]]\nargs = [\"a\"\n\"b\"]", 3, Kind::ExpectedComma),
        ("[agent]\nmax_running 1", 2, Kind::ExpectedEquals),
        ("[agent]\nmax_running =", 2, Kind::ExpectedValue),
        ("[agent]\nmax_running = eight", 2, Kind::ExpectedValue),
        ("[agent]\nmax_running = 1 2", 2, Kind::TrailingCharacters),
        ("[agent] [push]", 1, Kind::TrailingCharacters),
        ("[agent]\n!x = 1", 2, Kind::InvalidKey),
        ("\n\n[agent", 3, Kind::InvalidHeader),
        ("[agent]\nmax_running = 08", 2, Kind::InvalidInteger),
        ("[agent]\nmax_running = 1_", 2, Kind::InvalidInteger),
        (
            "[agent]\nmax_running = 18446744073709551616",
            2,
            Kind::IntegerOverflow,
        ),
    ];
    for (text, line, kind) in cases {
        assert_eq!(error(text), (*line, kind.clone()), "{text:?}");
    }
}

#[test]
fn unsupported_toml() {
    let cases: &[(&str, Unsupported)] = &[
        (
            "[[command]]\ndescription = \"\"\"x\"\"\"",
            Unsupported::MultiLineString,
        ),
        (
            "[[command]]\ndescription = '''x'''",
            Unsupported::MultiLineString,
        ),
        ("[agent]\nmax_running = 1.0", Unsupported::Float),
        ("[agent]\nmax_running = 1e1", Unsupported::Float),
        ("[agent]\nmax_running = inf", Unsupported::Float),
        ("[agent]\nmax_running = 2024-01-01", Unsupported::DateTime),
        ("[agent]\nmax_running = 12:00:00", Unsupported::DateTime),
        (
            "[agent]\nmax_running = 0x10",
            Unsupported::NonDecimalInteger,
        ),
        ("[agent]\nmax_running = {}", Unsupported::InlineTable),
        ("[[command]]\nargs = [[\"a\"]]", Unsupported::NestedArray),
        ("[agent]\nlimits.max = 1", Unsupported::DottedKey),
        ("[agent]\n\"max_running\" = 1", Unsupported::QuotedKey),
        ("[ \"agent\" ]", Unsupported::QuotedKey),
        ("[agent]\n[server]", Unsupported::Table(snip("server"))),
        (
            "[agent]\n[agent.limits]",
            Unsupported::Table(snip("agent.limits")),
        ),
        ("[agent]\n[command]", Unsupported::Table(snip("command"))),
        (
            "[agent]\n[[push]]",
            Unsupported::ArrayOfTables(snip("push")),
        ),
        (
            "[agent]\n[[ cmd ]]",
            Unsupported::ArrayOfTables(snip("cmd")),
        ),
        (
            "[agent]\n[[command.param.choice]]",
            Unsupported::ArrayOfTables(snip("command.param.choice")),
        ),
    ];
    for (text, what) in cases {
        let (line, kind) = error(text);
        assert_eq!(kind, Kind::Unsupported(what.clone()), "{text:?}");
        assert_eq!(line, 2 - u32::from(text.starts_with("[ \"")), "{text:?}");
        let message = ConfigError { line, kind }.to_string();
        assert!(
            message.ends_with("is not supported by the Portless config subset")
                || message.contains("is not supported by the Portless config subset ("),
            "{message}"
        );
    }
}

#[test]
fn structural_errors() {
    let cases: &[(&str, u32, Kind)] = &[
        (
            "[agent]\n[push]\n[agent]",
            3,
            Kind::DuplicateTable(Table::Agent),
        ),
        ("[push]\n\n[push]", 3, Kind::DuplicateTable(Table::Push)),
        ("[agent]\n[[command.param]]", 2, Kind::ParamOutsideCommand),
        (
            "max_running = 1",
            1,
            Kind::UnknownKey {
                key: snip("max_running"),
                table: Table::Root,
            },
        ),
        (
            "[agent]\nmax_runing = 1",
            2,
            Kind::UnknownKey {
                key: snip("max_runing"),
                table: Table::Agent,
            },
        ),
        (
            "[push]\nenable = true",
            2,
            Kind::UnknownKey {
                key: snip("enable"),
                table: Table::Push,
            },
        ),
        (
            "[[command]]\nname = \"a\"\ntiemout_ms = 5",
            3,
            Kind::UnknownKey {
                key: snip("tiemout_ms"),
                table: Table::Command,
            },
        ),
        (
            "[[command]]\n[[command.param]]\nchoice = []",
            3,
            Kind::UnknownKey {
                key: snip("choice"),
                table: Table::Param,
            },
        ),
        (
            "[agent]\nmax_running = 1\nmax_running = 2",
            3,
            Kind::DuplicateKey {
                key: "max_running",
                table: Table::Agent,
            },
        ),
        (
            "[push]\ndir = \"/a\"\ndir = \"/b\"",
            3,
            Kind::DuplicateKey {
                key: "dir",
                table: Table::Push,
            },
        ),
        (
            "[[command]]\nname = \"a\"\nname = \"b\"",
            3,
            Kind::DuplicateKey {
                key: "name",
                table: Table::Command,
            },
        ),
        (
            "[[command]]\n[[command.param]]\nkind = \"integer\"\nkind = \"integer\"",
            4,
            Kind::DuplicateKey {
                key: "kind",
                table: Table::Param,
            },
        ),
        (
            "[[command]]\nprogram = \"/a\"",
            1,
            Kind::MissingKey {
                key: "name",
                table: Table::Command,
            },
        ),
        (
            "[[command]]\nname = \"a\"\n[[command]]\nname = \"b\"\nprogram = \"/b\"",
            1,
            Kind::MissingKey {
                key: "program",
                table: Table::Command,
            },
        ),
    ];
    for (text, line, kind) in cases {
        assert_eq!(error(text), (*line, kind.clone()), "{text:?}");
    }
}

#[test]
fn missing_param_keys_are_reported_at_the_param_header() {
    let header = 4; // `command("")` is three lines
    let cases: &[(&str, &'static str)] = &[
        ("kind = \"integer\"\nmin = 1\nmax = 2", "name"),
        ("name = \"a\"", "kind"),
        ("name = \"a\"\nkind = \"integer\"\nmax = 2", "min"),
        ("name = \"a\"\nkind = \"integer\"\nmin = 2", "max"),
        ("name = \"a\"\nkind = \"choice\"", "choices"),
        ("name = \"a\"\nkind = \"string\"\nmax_len = 2", "charset"),
        (
            "name = \"a\"\nkind = \"string\"\ncharset = \"a\"",
            "max_len",
        ),
    ];
    for (param, key) in cases {
        let text = command(&format!("[[command.param]]\n{param}\n"));
        assert_eq!(
            error(&text),
            (
                header,
                Kind::MissingKey {
                    key,
                    table: Table::Param
                }
            ),
            "{text}"
        );
    }
}

#[test]
fn wrong_types() {
    let cases: &[(&str, Kind)] = &[
        (
            "[agent]\nmax_running = \"8\"",
            wrong("max_running", ValueType::Integer, ValueType::String),
        ),
        (
            "[push]\nenabled = 1",
            wrong("enabled", ValueType::Boolean, ValueType::Integer),
        ),
        (
            "[push]\ndir = true",
            wrong("dir", ValueType::String, ValueType::Boolean),
        ),
        (
            "[push]\nuser = [\"root\"]",
            wrong("user", ValueType::StringOrInteger, ValueType::Array),
        ),
        (
            "[[command]]\nname = 5",
            wrong("name", ValueType::String, ValueType::Integer),
        ),
        (
            "[[command]]\nargs = \"-a\"",
            wrong("args", ValueType::Array, ValueType::String),
        ),
        (
            "[[command]]\ngroup = false",
            wrong("group", ValueType::StringOrInteger, ValueType::Boolean),
        ),
        (
            "[[command]]\n[[command.param]]\nmin = \"1\"",
            wrong("min", ValueType::Integer, ValueType::String),
        ),
        (
            "[[command]]\n[[command.param]]\nmax_len = []",
            wrong("max_len", ValueType::Integer, ValueType::Array),
        ),
        (
            "[[command]]\n[[command.param]]\nkind = 1",
            wrong("kind", ValueType::String, ValueType::Integer),
        ),
    ];
    for (text, kind) in cases {
        let line = u32::try_from(text.lines().count()).unwrap();
        assert_eq!(error(text), (line, kind.clone()), "{text:?}");
    }
    // An element of the wrong type is reported at its own line.
    assert_eq!(
        error("[[command]]\nenv = [\n\"A=1\",\n2,\n]"),
        (
            4,
            Kind::WrongElementType {
                key: "env",
                found: ValueType::Integer
            }
        )
    );
    assert_eq!(
        error("[[command]]\n[[command.param]]\nchoices = [\"a\", true]"),
        (
            3,
            Kind::WrongElementType {
                key: "choices",
                found: ValueType::Boolean
            }
        )
    );
    assert_eq!(
        error("[[command]]\nargs = [\"a\", 1]"),
        (
            2,
            Kind::WrongElementType {
                key: "args",
                found: ValueType::Integer
            }
        )
    );
}

fn out_of_range(key: &'static str, value: i64, min: i64, max: i64) -> Kind {
    Kind::OutOfRange {
        key,
        value,
        min,
        max,
    }
}

#[test]
fn numbers_out_of_range() {
    let u32_max = i64::from(u32::MAX);
    let cases: &[(&str, Kind)] = &[
        (
            "[agent]\nmax_running = 0",
            out_of_range("max_running", 0, 1, 16),
        ),
        (
            "[agent]\nmax_running = 17",
            out_of_range("max_running", 17, 1, 16),
        ),
        (
            "[agent]\nkill_grace_ms = -1",
            out_of_range("kill_grace_ms", -1, 0, u32_max),
        ),
        (
            "[agent]\ndefault_timeout_ms = 4294967296",
            out_of_range("default_timeout_ms", u32_max + 1, 0, u32_max),
        ),
        (
            "[agent]\ndefault_max_output = -5",
            out_of_range("default_max_output", -5, 0, i64::MAX),
        ),
        (
            "[push]\nmax_bytes = 0",
            out_of_range("max_bytes", 0, 1, i64::MAX),
        ),
        (
            "[push]\ntimeout_ms = 5_000_000_000",
            out_of_range("timeout_ms", 5_000_000_000, 0, u32_max),
        ),
        (
            "[push]\nuser = 4294967295",
            out_of_range("user", u32_max, 0, u32_max - 1),
        ),
        (
            "[[command]]\ngroup = -1",
            out_of_range("group", -1, 0, u32_max - 1),
        ),
        (
            "[[command]]\ntimeout_ms = -1",
            out_of_range("timeout_ms", -1, 0, u32_max),
        ),
        (
            "[[command]]\nmemory_max = 4096",
            out_of_range("memory_max", 4096, 1 << 20, i64::MAX),
        ),
        (
            "[[command]]\npids_max = 0",
            out_of_range("pids_max", 0, 1, 4 << 20),
        ),
        (
            "[[command]]\ncpu_max_percent = 100001",
            out_of_range("cpu_max_percent", 100_001, 1, 100_000),
        ),
        (
            "[[command]]\nmax_output = -1",
            out_of_range("max_output", -1, 0, i64::MAX),
        ),
        (
            "[[command]]\n[[command.param]]\nmax_len = 1025",
            out_of_range("max_len", 1025, 0, 1024),
        ),
        (
            "[[command]]\n[[command.param]]\nmin_len = -1",
            out_of_range("min_len", -1, 0, 1024),
        ),
    ];
    for (text, kind) in cases {
        let line = u32::try_from(text.lines().count()).unwrap();
        assert_eq!(error(text), (line, kind.clone()), "{text:?}");
    }
}

#[test]
fn names_paths_and_principals() {
    let long_name = "n".repeat(65);
    let cases: Vec<(String, u32, Kind)> = vec![
        (
            "[[command]]\nname = \"\"".into(),
            2,
            Kind::InvalidCommandName(snip("")),
        ),
        (
            "[[command]]\nname = \"a b\"".into(),
            2,
            Kind::InvalidCommandName(snip("a b")),
        ),
        (
            "[[command]]\nname = \"ünï\"".into(),
            2,
            Kind::InvalidCommandName(snip("ünï")),
        ),
        (
            format!("[[command]]\nname = \"{long_name}\""),
            2,
            Kind::InvalidCommandName(snip(&long_name)),
        ),
        (
            format!("{}\n[[command]]\nname = \"c\"", command("")),
            6,
            Kind::DuplicateCommand(snip("c")),
        ),
        (
            "[[command]]\nprogram = \"bin/ls\"".into(),
            2,
            Kind::NotAbsolute { key: "program" },
        ),
        (
            "[[command]]\nprogram = \"\"".into(),
            2,
            Kind::NotAbsolute { key: "program" },
        ),
        (
            "[[command]]\ncwd = \"./x\"".into(),
            2,
            Kind::NotAbsolute { key: "cwd" },
        ),
        (
            "[push]\ndir = \"push\"".into(),
            2,
            Kind::NotAbsolute { key: "dir" },
        ),
        (
            format!("[[command]]\ndescription = \"{}\"", "d".repeat(257)),
            2,
            Kind::TooLong {
                key: "description",
                max: 256,
            },
        ),
    ];
    for (text, line, kind) in &cases {
        assert_eq!(error(text), (*line, kind.clone()), "{text:?}");
    }
    let ok = parse(&format!(
        "[[command]]\nname = \"{}\"\nprogram = \"/p\"\ndescription = \"{}\"",
        "A-z_0.9".repeat(10).get(..64).unwrap(),
        "d".repeat(256)
    ));
    assert_eq!(ok.commands().next().unwrap().description().len(), 256);

    for bad in ["", "-root", "a b", "a:b", "é", &"u".repeat(33)] {
        for key in ["user", "group"] {
            assert_eq!(
                error(&command(&format!("{key} = \"{bad}\""))),
                (4, Kind::InvalidPrincipal { key }),
                "{bad}"
            );
        }
        assert_eq!(
            error(&format!("[push]\nuser = \"{bad}\"")),
            (2, Kind::InvalidPrincipal { key: "user" })
        );
    }
    let ok = parse(&command(&format!(
        "user = \"{}\"\ngroup = \"1000\"",
        "u".repeat(32)
    )));
    let c = ok.command("c").unwrap();
    assert_eq!(c.user(), Some(Principal::Name(&"u".repeat(32))));
    assert_eq!(c.group(), Some(Principal::Name("1000")));
}

#[test]
fn env_entries() {
    for bad in ["FOO", "=x", "1A=x", "A-B=x", "A B=x", "É=x", ""] {
        assert_eq!(
            error(&command(&format!("env = [\"OK=1\",\n\"{bad}\"]"))),
            (5, Kind::InvalidEnv(snip(bad))),
            "{bad}"
        );
    }
    assert_eq!(
        error(&command("env = [\"A=1\", \"B=2\", \"A=3\"]")),
        (4, Kind::DuplicateEnv(snip("A")))
    );
    let config = parse(&command("env = [\"a=\", \"A=\"]"));
    assert_eq!(
        config.command("c").unwrap().env().len(),
        2,
        "keys are case-sensitive"
    );
}

#[test]
fn placeholder_errors() {
    let param = |name: &str| {
        format!("[[command.param]]\nname = \"{name}\"\nkind = \"integer\"\nmin = 0\nmax = 1\n")
    };
    // Undeclared placeholder: reported at the args line.
    assert_eq!(
        error(&format!(
            "{}{}",
            command("args = [\"{a}\", \"{b}\"]\n"),
            param("a")
        )),
        (4, Kind::UnknownPlaceholder(snip("{b}")))
    );
    // Used twice.
    assert_eq!(
        error(&format!(
            "{}{}",
            command("timeout_ms = 1\nargs = [\"{a}\", \"{a}\"]\n"),
            param("a")
        )),
        (5, Kind::ParamUsedTwice(snip("a")))
    );
    // Unused: reported at the parameter's header.
    assert_eq!(
        error(&format!(
            "{}{}{}",
            command("args = [\"{a}\"]\n"),
            param("a"),
            param("b")
        )),
        (10, Kind::UnusedParam(snip("b")))
    );
    assert_eq!(
        error(&format!("{}{}", command(""), param("a"))),
        (4, Kind::UnusedParam(snip("a")))
    );
    // The check runs for every command, not only the last.
    assert_eq!(
        error(&format!(
            "{}{}{}",
            command("args = [\"{z}\"]\n"),
            "\n",
            command("")
        )),
        (4, Kind::UnknownPlaceholder(snip("{z}")))
    );
}

#[test]
fn param_errors() {
    let text = |body: &str| command(&format!("args = [\"{{a}}\"]\n[[command.param]]\n{body}"));
    let cases: Vec<(String, u32, Kind)> = vec![
        (text("name = \"A\""), 6, Kind::InvalidParamName(snip("A"))),
        (text("name = \"\""), 6, Kind::InvalidParamName(snip(""))),
        (
            text(&format!("name = \"{}\"", "a".repeat(33))),
            6,
            Kind::InvalidParamName(snip(&"a".repeat(33))),
        ),
        (
            text(
                "name = \"a\"\nkind = \"integer\"\nmin = 1\nmax = 1\n[[command.param]]\nname = \"a\"",
            ),
            11,
            Kind::DuplicateParam(snip("a")),
        ),
        (
            text("kind = \"int\""),
            6,
            Kind::UnknownParamKind(snip("int")),
        ),
        (
            text("name = \"a\"\nkind = \"integer\"\nmin = 5\nmax = 4"),
            8,
            Kind::MinAboveMax { min: 5, max: 4 },
        ),
        (
            text("name = \"a\"\nkind = \"string\"\ncharset = \"a\"\nmax_len = 4\nmin_len = 5"),
            10,
            Kind::MinLenAboveMaxLen {
                min_len: 5,
                max_len: 4,
            },
        ),
        (text("choices = []"), 6, Kind::NoChoices),
        (
            text("choices = [\"a\", \"\"]"),
            6,
            Kind::InvalidChoice(snip("")),
        ),
        (
            text("choices = [\"a\",\n\"b|c\"]"),
            7,
            Kind::InvalidChoice(snip("b|c")),
        ),
        (
            text(&format!("choices = [\"{}\"]", "é".repeat(65))),
            6,
            Kind::InvalidChoice(snip(&"é".repeat(65))),
        ),
        (
            text("choices = [\"a\", \"b\", \"a\"]"),
            6,
            Kind::DuplicateChoice(snip("a")),
        ),
        (
            text("choices = [\"ab\", \"a\", \"b\"]").replace("\"b\"]", "\"b\", \"b\"]"),
            6,
            Kind::DuplicateChoice(snip("b")),
        ),
        (
            text("charset = \"z-a\""),
            6,
            Kind::InvalidCharset(CharsetError::ReversedRange {
                low: 'z',
                high: 'a',
            }),
        ),
        (
            text("charset = \"\""),
            6,
            Kind::InvalidCharset(CharsetError::Empty),
        ),
        (
            text("charset = \"a-z\\\\\""),
            6,
            Kind::InvalidCharset(CharsetError::TrailingBackslash),
        ),
    ];
    for (text, line, kind) in &cases {
        assert_eq!(error(text), (*line, kind.clone()), "{text}");
    }
    let choices = parse(&text(&format!(
        "name = \"a\"\nkind = \"choice\"\nchoices = [\"{}\", \"ab\", \"a\", \"b\"]",
        "é".repeat(64)
    )));
    let info = choices.command("c").unwrap().info();
    assert_eq!(
        info.params[0].kind,
        ParamKind::OneOf {
            choices: &format!("{}|ab|a|b", "é".repeat(64))
        }
    );
}

#[test]
fn keys_that_do_not_fit_the_kind() {
    let text = |kind: &str, extra: &str| {
        command(&format!(
            "args = [\"{{a}}\"]\n[[command.param]]\nname = \"a\"\nkind = \"{kind}\"\n{extra}"
        ))
    };
    let integer = "min = 1\nmax = 2\n";
    let choice = "choices = [\"x\"]\n";
    let string = "charset = \"a\"\nmax_len = 3\nmin_len = 1\n";
    for (kind, own, foreign, key) in [
        ("integer", integer, "choices = [\"x\"]", "choices"),
        ("integer", integer, "charset = \"a\"", "charset"),
        ("integer", integer, "min_len = 1", "min_len"),
        ("integer", integer, "max_len = 1", "max_len"),
        ("choice", choice, "min = 1", "min"),
        ("choice", choice, "max = 1", "max"),
        ("choice", choice, "charset = \"a\"", "charset"),
        ("choice", choice, "max_len = 1", "max_len"),
        ("string", string, "min = 1", "min"),
        ("string", string, "choices = [\"x\"]", "choices"),
    ] {
        parse(&text(kind, own));
        let body = format!("{own}{foreign}\n");
        let line = 8 + u32::try_from(own.lines().count()).unwrap();
        assert_eq!(
            error(&text(kind, &body)),
            (line, Kind::KeyNotForKind { key, kind }),
            "{kind} {foreign}"
        );
    }
    // `kind` may come last: the check waits for the end of the table.
    let late = command(
        "args = [\"{a}\"]\n[[command.param]]\nmin = 1\nname = \"a\"\nkind = \"choice\"\nchoices = [\"x\"]\n",
    );
    assert_eq!(
        error(&late),
        (
            6,
            Kind::KeyNotForKind {
                key: "min",
                kind: "choice"
            }
        )
    );
}

// --- Capacities ---

fn commands(n: usize) -> String {
    (0..n)
        .map(|i| format!("[[command]]\nname = \"c{i}\"\nprogram = \"/p\"\n"))
        .collect()
}

fn params(n: usize) -> String {
    let placeholders: Vec<String> = (0..n).map(|i| format!("\"{{p{i}}}\"")).collect();
    let mut text = command(&format!("args = [{}]\n", placeholders.join(", ")));
    for i in 0..n {
        text +=
            &format!("[[command.param]]\nname = \"p{i}\"\nkind = \"integer\"\nmin = 0\nmax = 9\n");
    }
    text
}

#[test]
fn capacities() {
    assert_eq!(parse(&commands(MAX_COMMANDS)).command_count(), MAX_COMMANDS);
    assert_eq!(
        error(&commands(MAX_COMMANDS + 1)),
        (
            u32::try_from(3 * MAX_COMMANDS + 1).unwrap(),
            Kind::TooMany(Capacity::Commands)
        )
    );

    let config = parse(&params(MAX_PARAMS));
    let c = config.command("c").unwrap();
    assert_eq!(c.param_count(), MAX_PARAMS);
    let args: Vec<&str> = (0..MAX_PARAMS).map(|_| "1").collect();
    assert_eq!(c.check_args(&args), Ok(()));
    assert_eq!(c.info().params.len(), MAX_PARAMS);
    assert_eq!(
        error(&params(MAX_PARAMS + 1)),
        (
            u32::try_from(5 + 5 * MAX_PARAMS).unwrap(),
            Kind::TooMany(Capacity::Params)
        )
    );

    let elements = |n: usize| vec!["\"x\""; n].join(",\n");
    let c = parse(&command(&format!("args = [\n{}\n]", elements(MAX_ARGV))));
    assert_eq!(c.command("c").unwrap().argv(&[]).count(), 1 + MAX_ARGV);
    assert_eq!(
        error(&command(&format!(
            "args = [\n{}\n]",
            elements(MAX_ARGV + 1)
        ))),
        (
            u32::try_from(5 + MAX_ARGV).unwrap(),
            Kind::TooMany(Capacity::Args)
        )
    );

    let entries = |n: usize| {
        (0..n)
            .map(|i| format!("\"V{i}=x\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let c = parse(&command(&format!("env = [{}]", entries(MAX_ENV))));
    assert_eq!(c.command("c").unwrap().env().len(), MAX_ENV);
    assert_eq!(
        error(&command(&format!("env = [{}]", entries(MAX_ENV + 1)))),
        (4, Kind::TooMany(Capacity::Env))
    );
}

#[test]
fn arena_capacity() {
    // Descriptions of 256 bytes: 128 commands' worth would need 32 KiB, but only 64 commands
    // fit; so fill the arena with env entries instead.
    let value = "v".repeat(1000);
    let mut text = String::new();
    let mut needed = 0;
    let mut i = 0;
    while needed <= ARENA_BYTES {
        let entries: Vec<String> = (0..MAX_ENV).map(|k| format!("\"K{k}={value}\"")).collect();
        text += &format!(
            "[[command]]\nname = \"c{i}\"\nprogram = \"/p\"\nenv = [{}]\n",
            entries.join(", ")
        );
        needed += MAX_ENV * 1003;
        i += 1;
    }
    let (line, kind) = error(&text);
    assert_eq!(kind, Kind::ArenaFull);
    assert_eq!(line % 4, 0, "reported at an env line");
    assert!(
        Kind::ArenaFull.to_string().contains("32768"),
        "{}",
        Kind::ArenaFull
    );
    // Just below the limit still loads.
    let fits = parse(&command(&format!(
        "description = \"\"\nenv = [\"K={}\"]",
        "v".repeat(ARENA_BYTES - 30)
    )));
    assert!(fits.arena_used() <= ARENA_BYTES);
}

#[test]
fn listings_fit_one_frame() {
    use ring_protocol::message::AgentToHost;

    let choices = |n: usize, width: usize| -> String {
        (0..n)
            .map(|i| format!("\"{i:0width$}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let choice_param = |name: &str, list: &str| {
        format!("[[command.param]]\nname = \"{name}\"\nkind = \"choice\"\nchoices = [{list}]\n")
    };
    // One choice list too long: reported at the element that crosses the limit.
    let text = format!(
        "{}{}",
        command("args = [\"{a}\"]\n"),
        choice_param("a", &choices(1000, 9).replace(", ", ",\n"))
    );
    assert_eq!(
        error(&text),
        (
            417, // line 8 holds the first choice; the 410th crosses the limit
            Kind::ListingTooLarge {
                bytes: 4099,
                max: MAX_LISTING_TEXT
            }
        )
    );
    // One charset too long.
    let text = command(&format!(
        "args = [\"{{a}}\"]\n[[command.param]]\nname = \"a\"\nkind = \"string\"\nmax_len = 1\ncharset = \"{}\"",
        "a".repeat(MAX_LISTING_TEXT + 1)
    ));
    assert_eq!(
        error(&text),
        (
            9, // the charset line
            Kind::ListingTooLarge {
                bytes: MAX_LISTING_TEXT + 1,
                max: MAX_LISTING_TEXT
            }
        )
    );

    // Several parts that fit alone but not together: reported at the command's header.
    let names: Vec<String> = (0..MAX_PARAMS).map(|i| format!("p{i}")).collect();
    let build = |description: usize, width: usize| {
        let placeholders: Vec<String> = names.iter().map(|n| format!("\"{{{n}}}\"")).collect();
        let mut text = format!(
            "\n[[command]]\nname = \"{}\"\nprogram = \"/p\"\ndescription = \"{}\"\nargs = [{}]\n",
            "n".repeat(MAX_NAME_LEN),
            "d".repeat(description),
            placeholders.join(", ")
        );
        for name in &names {
            text += &choice_param(name, &choices(50, width));
        }
        text
    };
    // 64 + 256 + 8 * (2 + 50 * 9 - 1) = 3928 bytes: fits.
    let config = parse(&build(MAX_DESCRIPTION_LEN, 8));
    let info = config.commands().next().unwrap().info();
    let message = AgentToHost::Command {
        request_id: u64::MAX,
        index: u16::MAX,
        info: ring_protocol::message::CommandInfo {
            timeout_ms: u32::MAX,
            max_output: u64::MAX,
            ..info
        },
    };
    let mut frame = ring_protocol::frame_buf();
    let used = postcard::to_slice(&message, &mut frame).unwrap().len();
    assert!(used < ring_protocol::MAX_PAYLOAD_LEN - 1024, "{used} bytes");
    // 64 + 256 + 8 * (2 + 50 * 10 - 1) = 4328 bytes: too many.
    assert_eq!(
        error(&build(MAX_DESCRIPTION_LEN, 9)),
        (
            2,
            Kind::ListingTooLarge {
                bytes: 4328,
                max: MAX_LISTING_TEXT
            }
        )
    );
}

// --- Requests ---

fn checker() -> Box<Config> {
    parse(
        r#"
[[command]]
name = "c"
program = "/c"
args = ["{n}", "--", "{mode}", "{path}"]
[[command.param]]
name = "n"
kind = "integer"
min = -5
max = 100
[[command.param]]
name = "mode"
kind = "choice"
choices = ["fast", "slow", "very slow"]
[[command.param]]
name = "path"
kind = "string"
charset = "a-z/\\-"
min_len = 2
max_len = 6
"#,
    )
}

#[test]
fn check_args_reports_each_problem_at_its_index() {
    let config = checker();
    let c = config.command("c").unwrap();
    assert_eq!(c.check_args(&["0", "fast", "/a"]), Ok(()));
    assert_eq!(c.check_args(&["-5", "very slow", "a-b/cd"]), Ok(()));
    assert_eq!(c.check_args(&[]), invalid(0, ArgProblem::Missing));
    assert_eq!(c.check_args(&["1"]), invalid(1, ArgProblem::Missing));
    assert_eq!(
        c.check_args(&["1", "fast"]),
        invalid(2, ArgProblem::Missing)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "ab", "x"]),
        invalid(3, ArgProblem::Unexpected)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "ab", "x", "y"]),
        invalid(3, ArgProblem::Unexpected)
    );
    // The first problem by position wins.
    assert_eq!(
        c.check_args(&["x", "nope"]),
        invalid(0, ArgProblem::NotInteger)
    );
    assert_eq!(
        c.check_args(&["1", "nope"]),
        invalid(1, ArgProblem::NotAChoice)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "a"]),
        invalid(2, ArgProblem::BadLength)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "abcdefg"]),
        invalid(2, ArgProblem::BadLength)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "a_b"]),
        invalid(2, ArgProblem::BadCharacter)
    );
    assert_eq!(
        c.check_args(&["1", "fast", "AB"]),
        invalid(2, ArgProblem::BadCharacter)
    );
    assert_eq!(
        c.check_args(&["101", "fast", "ab"]),
        invalid(0, ArgProblem::OutOfRange)
    );
    assert_eq!(
        c.check_args(&["-6", "fast", "ab"]),
        invalid(0, ArgProblem::OutOfRange)
    );
    assert_eq!(
        c.check_args(&["1", "Fast", "ab"]),
        invalid(1, ArgProblem::NotAChoice)
    );
    assert_eq!(
        c.check_args(&["1", "fast|slow", "ab"]),
        invalid(1, ArgProblem::NotAChoice)
    );
    assert_eq!(
        c.check_args(&["1", "", "ab"]),
        invalid(1, ArgProblem::NotAChoice)
    );
}

#[test]
fn integers_must_be_canonical() {
    let kind = ParamKind::Integer {
        min: i64::MIN,
        max: i64::MAX,
    };
    for ok in [
        "0",
        "7",
        "-7",
        "10",
        "9223372036854775807",
        "-9223372036854775808",
    ] {
        assert_eq!(check_value(&kind, ok), Ok(()), "{ok}");
    }
    for bad in [
        "", "-", "+1", "01", "-01", "00", "-0", " 1", "1 ", "1_000", "1.0", "1e3", "0x10", "½", "٣",
    ] {
        assert_eq!(
            check_value(&kind, bad),
            Err(ArgProblem::NotInteger),
            "{bad:?}"
        );
    }
    for big in [
        "9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999",
    ] {
        assert_eq!(
            check_value(&kind, big),
            Err(ArgProblem::OutOfRange),
            "{big}"
        );
    }
    let small = ParamKind::Integer { min: 1, max: 3 };
    assert_eq!(check_value(&small, "0"), Err(ArgProblem::OutOfRange));
    assert_eq!(check_value(&small, "3"), Ok(()));
}

#[test]
fn text_lengths_are_bytes() {
    let kind = ParamKind::Text {
        class: "é",
        min_len: 2,
        max_len: 2,
    };
    assert_eq!(check_value(&kind, "é"), Ok(()), "one char, two bytes");
    assert_eq!(check_value(&kind, "éé"), Err(ArgProblem::BadLength));
    let broken = ParamKind::Text {
        class: "z-a",
        min_len: 0,
        max_len: 9,
    };
    assert_eq!(check_value(&broken, "a"), Err(ArgProblem::BadCharacter));
}

#[test]
fn argv_substitutes_placeholders() {
    let config = checker();
    let c = config.command("c").unwrap();
    let args = ["42", "very slow", "/tmp"];
    assert_eq!(c.check_args(&args), Ok(()));
    assert_eq!(argv(c, &args), ["/c", "42", "--", "very slow", "/tmp"]);
    let rest: Vec<&str> = c.substituted_args(&args).collect();
    assert_eq!(rest, ["42", "--", "very slow", "/tmp"]);
    assert_eq!(c.substituted_args(&args).len(), c.args().len());
    assert_eq!(
        c.args().collect::<Vec<_>>(),
        [
            ArgTemplate::Param {
                index: 0,
                name: "n"
            },
            ArgTemplate::Literal("--"),
            ArgTemplate::Param {
                index: 1,
                name: "mode"
            },
            ArgTemplate::Param {
                index: 2,
                name: "path"
            },
        ]
    );
    // Placeholders may come in any order.
    let reordered = parse(
        r#"
[[command]]
name = "r"
program = "/r"
args = ["{b}", "mid", "{a}"]
[[command.param]]
name = "a"
kind = "choice"
choices = ["x"]
[[command.param]]
name = "b"
kind = "choice"
choices = ["y"]
"#,
    );
    let r = reordered.command("r").unwrap();
    assert_eq!(argv(r, &["x", "y"]), ["/r", "y", "mid", "x"]);
    // Missing values come out empty rather than panicking.
    assert_eq!(argv(r, &[]), ["/r", "", "mid", ""]);
}

#[test]
fn info_lists_the_command_for_the_host() {
    let config = parse(
        r#"
[agent]
default_timeout_ms = 1234
default_max_output = 99

[[command]]
name = "i"
description = "Info"
program = "/i"
args = ["{n}", "{w}", "{t}"]
[[command.param]]
name = "n"
kind = "integer"
min = -1
max = 1
[[command.param]]
name = "w"
kind = "choice"
choices = ["a", "b c"]
[[command.param]]
name = "t"
kind = "string"
charset = '\-a-f'
max_len = 1024

[[command]]
name = "j"
program = "/j"
timeout_ms = 0
max_output = 5
"#,
    );
    let info = config.command("i").unwrap().info();
    assert_eq!(info.name, "i");
    assert_eq!(info.description, "Info");
    assert_eq!(info.timeout_ms, 1234);
    assert_eq!(info.max_output, 99);
    assert_eq!(
        info.params.as_slice(),
        [
            ParamSpec {
                name: "n",
                kind: ParamKind::Integer { min: -1, max: 1 }
            },
            ParamSpec {
                name: "w",
                kind: ParamKind::OneOf { choices: "a|b c" }
            },
            ParamSpec {
                name: "t",
                kind: ParamKind::Text {
                    class: "\\-a-f",
                    min_len: 0,
                    max_len: 1024
                }
            },
        ]
    );
    let j = config.command("j").unwrap().info();
    assert_eq!((j.description, j.timeout_ms, j.max_output), ("", 0, 5));
    assert!(j.params.is_empty());
    // The listing is what the wire carries: it round-trips through postcard.
    let mut buf = [0u8; 512];
    let encoded = postcard::to_slice(&info, &mut buf).unwrap();
    let decoded: ring_protocol::message::CommandInfo<'_> = postcard::from_bytes(encoded).unwrap();
    assert_eq!(decoded, info);
}

// --- Messages ---

#[test]
fn error_messages() {
    let shown = |text: &str| {
        let mut config = Box::new(Config::new());
        config.load(text).unwrap_err().to_string()
    };
    assert_eq!(
        shown("[[command]]\nname = \"a\"\ntiemout_ms = 5"),
        "line 3: unknown key \"tiemout_ms\" in [[command]]"
    );
    assert_eq!(
        shown("[agent]\nmax_running = 20"),
        "line 2: \"max_running\" = 20 is outside 1..=16"
    );
    assert_eq!(
        shown("[agent]\nmax_running = 1.5"),
        "line 2: a floating-point number is not supported by the Portless config subset"
    );
    assert_eq!(
        shown("[[command]]\nprogram = \"/a\""),
        "line 1: missing required key \"name\" in [[command]]"
    );
    assert_eq!(
        shown("[server]"),
        "line 1: table [server] (the tables are [agent], [push], [[command]] and \
         [[command.param]]) is not supported by the Portless config subset"
    );
    assert_eq!(
        shown("[[command]]\nname = 1"),
        "line 2: \"name\" must be a string, not an integer"
    );
    assert_eq!(
        shown("x = 1"),
        "line 1: unknown key \"x\" in the top level (before any table header)"
    );
    assert_eq!(
        shown("[[command]]\n[[command.param]]\ncharset = \"a-\\\\\""),
        "line 3: invalid \"charset\": '\\' at the end escapes nothing"
    );
    // Long or odd offending text is cut and escaped.
    let long = shown(&format!("[agent]\n{} = 1", "k".repeat(100)));
    assert!(
        long.starts_with(&format!(
            "line 2: unknown key \"{}...\"",
            "k".repeat(SNIPPET_BYTES)
        )),
        "{long}"
    );
    assert_eq!(
        shown("[[command]]\nenv = [\"A\\n\"]"),
        "line 2: env entry \"A\\n\" is not KEY=VALUE with KEY matching [A-Za-z_][A-Za-z0-9_]*"
    );
    // Every kind has a message.
    let e: &dyn core::error::Error = &ConfigError {
        line: 1,
        kind: Kind::NoChoices,
    };
    assert_eq!(
        e.to_string(),
        "line 1: \"choices\" must list at least one choice"
    );
}

#[test]
fn snippets_cut_at_char_boundaries() {
    let s = Snippet::new(&"é".repeat(30));
    assert!(s.is_truncated());
    assert_eq!(s.as_str(), "é".repeat(20));
    let short = Snippet::new("ok");
    assert!(!short.is_truncated());
    assert_eq!(short.to_string(), "\"ok\"");
}

// --- Robustness ---

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Fragments that make random text likely to reach deep into the loader.
    const FRAGMENTS: &[&str] = &[
        "[agent]",
        "[push]",
        "[[command]]",
        "[[command.param]]",
        "[ [",
        "]]",
        "name",
        "program",
        "args",
        "env",
        "kind",
        "min",
        "max",
        "choices",
        "charset",
        "min_len",
        "max_len",
        "timeout_ms",
        "user",
        "group",
        "cwd",
        "description",
        "max_running",
        "enabled",
        "dir",
        " = ",
        "=",
        "\"",
        "'",
        "\"\"\"",
        "[",
        "]",
        ",",
        "{",
        "}",
        "{a}",
        "\"{a}\"",
        "\"a\"",
        "\"/bin/x\"",
        "\"integer\"",
        "\"choice\"",
        "\"string\"",
        "\"a-z\"",
        "1",
        "-1",
        "0",
        "1_0",
        "01",
        "1.5",
        "true",
        "false",
        "#",
        "# c",
        "\n",
        "\r\n",
        "\r",
        "\t",
        " ",
        "\\",
        "\\u00e9",
        "\\U0001F600",
        "\\uD800",
        "é",
        "\u{0}",
        "a",
        "A",
        "|",
        "-",
        ".",
    ];

    fn fragmented() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..80)
            .prop_map(|parts| parts.concat())
    }

    /// Checks what a successful load promises.
    fn check_invariants(config: &Config) {
        for command in config.commands() {
            assert!(!command.name().is_empty());
            assert!(command.program().starts_with('/'));
            let info = command.info();
            assert_eq!(info.params.len(), command.param_count());
            let mut used = vec![0; command.param_count()];
            for arg in command.args() {
                if let ArgTemplate::Param { index, .. } = arg {
                    used[index] += 1;
                }
            }
            assert!(used.iter().all(|&n| n == 1));
            let _ = command.check_args(&["1", "a", "x"]);
            let values: Vec<&str> = (0..command.param_count()).map(|_| "v").collect();
            assert_eq!(command.argv(&values).count(), 1 + command.args().len());
        }
        assert!(config.arena_used() <= ARENA_BYTES);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let mut config = Box::new(Config::new());
            if config.load(&text).is_ok() {
                check_invariants(&config);
            } else {
                prop_assert_eq!(&*config, &Config::new());
            }
        }

        #[test]
        fn fragmented_text_never_panics(text in fragmented()) {
            let mut config = Box::new(Config::new());
            match config.load(&text) {
                Ok(()) => check_invariants(&config),
                Err(e) => {
                    let lines = u32::try_from(text.split('\n').count()).unwrap();
                    prop_assert!(e.line >= 1 && e.line <= lines, "line {} of {}", e.line, lines);
                    let _ = e.to_string();
                }
            }
        }

        #[test]
        fn example_with_a_line_mutated_never_panics(
            line in 0usize..200,
            replacement in fragmented(),
        ) {
            let mut lines: Vec<&str> = EXAMPLE.lines().collect();
            let index = line % lines.len();
            lines[index] = &replacement;
            let text = lines.join("\n");
            let mut config = Box::new(Config::new());
            if config.load(&text).is_ok() {
                check_invariants(&config);
            }
        }

        #[test]
        fn check_value_never_panics(value in any::<String>(), min in any::<i64>(), max in any::<i64>(), class in "[a-z\\\\-]{0,6}") {
            let _ = check_value(&ParamKind::Integer { min, max }, &value);
            let _ = check_value(&ParamKind::OneOf { choices: &class }, &value);
            let _ = check_value(&ParamKind::Text { class: &class, min_len: 0, max_len: 1024 }, &value);
        }

        #[test]
        fn canonical_integers_round_trip(n in any::<i64>()) {
            let kind = ParamKind::Integer { min: i64::MIN, max: i64::MAX };
            prop_assert_eq!(check_value(&kind, &n.to_string()), Ok(()));
        }
    }
}
