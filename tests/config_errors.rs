//! Bad configuration: file, line, key, hint, exit 78, nothing started.

mod common;

use common::Setup;

const GOOD: &str = r#"
[daemon]
state = "sqlite://{dir}/state.db"
listen = "127.0.0.1:{port}"

[crm]
type = "file"
path = "{dir}/crm.json"

[sources.demo]
type = "demo"
schedule = "every 2m"
"#;

/// Runs `run` on a broken config and expects exit 78 with every fragment
/// on stderr, and nothing started.
fn check(config: &str, fragments: &[&str]) {
    let setup = Setup::new();
    setup.write_config(config);
    let output = setup.run(&["run"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "stderr: {stderr}");
    for fragment in fragments {
        let fragment = fragment.replace("{config}", &setup.path("config.toml").display().to_string());
        assert!(stderr.contains(&fragment), "missing {fragment:?} in:\n{stderr}");
    }
    assert!(!setup.path("state.db").exists(), "the state store was created");
    assert!(std::net::TcpListener::bind(("127.0.0.1", setup.port)).is_ok(), "the port was bound");

    // `check` reports the same and exits 78 too.
    let output = setup.run(&["check"], &[]);
    assert_eq!(output.status.code(), Some(78));
}

#[test]
fn bad_configs_exit_78_with_file_line_key_and_hint() {
    check(&GOOD.replace("listen =", "listne ="), &["{config}:4:1: `daemon.listne`: unknown field `listne`", "hint:"]);
    check(
        &GOOD.replace("\"every 2m\"", "\"every now and then\""),
        &["{config}:12:", "`sources.demo.schedule`", "invalid schedule", "hint: write `every 2m`"],
    );
    check(&GOOD.replace("\"every 2m\"", "\"99 * * * *\""), &["{config}:12:", "cron expression", "hint:"]);
    check(
        &GOOD.replace("type = \"demo\"", "type = \"demo\"\nper_page = \"many\""),
        &["{config}:12:", "`sources.demo.per_page`", "invalid type", "hint:"],
    );
    check(
        &GOOD.replace(
            "path = \"{dir}/crm.json\"",
            "path = \"{dir}/crm.json\"\ntimeout = { env = \"TRIBUTARY_TEST_UNSET_SECRET\" }",
        ),
        &["`crm.timeout`", "TRIBUTARY_TEST_UNSET_SECRET", "hint: set it where the service runs"],
    );
    // Several problems at once are all listed.
    check(&GOOD.replace("listen =", "listne =").replace("\"every 2m\"", "\"soon\""), &["2 problems", "listne", "soon"]);
}

#[test]
fn a_good_config_checks_clean() {
    let setup = Setup::new();
    setup.write_config(GOOD);
    let output = setup.run(&["check"], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration is valid"));
}
