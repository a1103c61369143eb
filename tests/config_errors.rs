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

/// Every source type: a minimal table checks clean, and a misspelled key in
/// it is reported with its line, key and hint.
#[test]
fn every_source_type_is_checked_with_line_and_hint() {
    let sources: &[(&str, &str)] = &[
        ("discourse", "base_url = \"https://forum.example.com\""),
        ("rss", "url = \"https://blog.example.com/feed\""),
        (
            "bluesky",
            "identifier = \"acme.example\"\napp_password = { env = \"TEST_YOUTUBE_KEY\" }\nsearch_terms = [\"acme\"]",
        ),
        ("github", "repos = [\"acme/widgets\"]"),
        ("hackernews", "terms = [\"acme\"]"),
        ("mastodon", "base_url = \"https://mastodon.example\"\nhashtags = [\"acme\"]"),
        (
            "reddit",
            "client_id = \"abc\"\nclient_secret = { env = \"TEST_YOUTUBE_KEY\" }\nuser_agent = \"linux:acme-tributary:1.0 (by /u/acme)\"\nsubreddits = [\"acme\"]",
        ),
        ("stackexchange", "site = \"stackoverflow\"\ntags = [\"acme\"]"),
        ("x", "bearer_token = { env = \"TEST_YOUTUBE_KEY\" }\nquery = \"acme -is:retweet\""),
        ("youtube", "api_key = { env = \"TEST_YOUTUBE_KEY\" }\nvideo_ids = [\"abc\"]"),
    ];
    for (kind, fields) in sources {
        let table = format!("[sources.s]\ntype = \"{kind}\"\nschedule = \"every 5m\"\n{fields}\n");
        let good = GOOD.replace("[sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n", &table);
        let setup = Setup::new();
        setup.write_config(&good);
        let output = setup.run(&["check"], &[("TEST_YOUTUBE_KEY", "k")]);
        assert!(output.status.success(), "{kind}: {}", String::from_utf8_lossy(&output.stderr));

        let line = good.lines().count() + 1;
        setup.write_config(&format!("{good}colour = \"blue\"\n"));
        let output = setup.run(&["check"], &[("TEST_YOUTUBE_KEY", "k")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{kind}: {stderr}");
        let expected = format!("config.toml:{line}:1: `sources.s.colour`: unknown field `colour`");
        assert!(stderr.contains(&expected), "{kind}: expected {expected:?} in\n{stderr}");
        assert!(stderr.contains("hint:"), "{kind}: {stderr}");
    }
}

/// What only the connector can judge is reported at its table, with a hint,
/// and new common keys are checked like the others.
#[test]
fn connector_refusals_and_on_delete_are_checked_with_line_and_hint() {
    let table = |fields: &str| {
        GOOD.replace(
            "[sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n",
            &format!("[sources.s]\ntype = \"x\"\nschedule = \"every 5m\"\n{fields}\n"),
        )
    };
    let both = "bearer_token = { env = \"TEST_X_TOKEN\" }\nquery = \"acme\"\n\
                oauth2 = { client_id = \"app\", refresh_token = { env = \"TEST_X_TOKEN\" } }";
    for (config, fragments) in [
        (
            table(both),
            vec![
                "config.toml:13:",
                "`sources.s.bearer_token`",
                "not both",
                "hint: the README shows a working `x` source",
            ],
        ),
        (table("query = \"acme\""), vec!["config.toml:10:", "`sources.s`", "bearer_token", "hint:"]),
        (
            table("bearer_token = { env = \"TEST_X_TOKEN\" }\nquery = \"acme\"\non_delete = \"shred\""),
            vec!["config.toml:15:", "`sources.s.on_delete`", "unknown variant `shred`", "hint:"],
        ),
    ] {
        let setup = Setup::new();
        setup.write_config(&config);
        let output = setup.run(&["check"], &[("TEST_X_TOKEN", "t")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{stderr}");
        for fragment in fragments {
            assert!(stderr.contains(fragment), "missing {fragment:?} in:\n{stderr}");
        }
    }
    let setup = Setup::new();
    setup.write_config(&table("bearer_token = { env = \"TEST_X_TOKEN\" }\nquery = \"acme\"\non_delete = \"archive\""));
    let output = setup.run(&["check"], &[("TEST_X_TOKEN", "t")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
