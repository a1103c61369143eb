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
        ("zendesk", "subdomain = \"acme\"\nemail = \"admin@acme.example\"\napi_token = { env = \"TEST_YOUTUBE_KEY\" }"),
        ("freshdesk", "domain = \"acme\"\napi_key = { env = \"TEST_YOUTUBE_KEY\" }"),
        ("intercom", "access_token = { env = \"TEST_YOUTUBE_KEY\" }"),
        ("http", HTTP_SOURCE),
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

/// A minimal declarative source; its tables come last so keys can follow.
const HTTP_SOURCE: &str = r#"platform = "forum"
url = "https://forum.example.com/api/posts?since={since_unix}"
items = "/posts"
watermark = "created_at"
pagination = { kind = "none" }
fields = { id = "/id", created_at = { pointer = "/created", transform = "unix" }, body = "/text" }"#;

/// The mistakes an administrator makes in a declarative definition are
/// reported by `check` at their line, with a hint.
#[test]
fn declarative_definition_mistakes_are_reported_at_their_line() {
    let config = |fields: &str| {
        GOOD.replace(
            "[sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n",
            &format!("[sources.s]\ntype = \"http\"\nschedule = \"every 5m\"\n{fields}\n"),
        )
    };
    // `[sources.s]` is line 10; in HTTP_SOURCE `items` is line 15, `pagination` 17.
    for (mistake, fragments) in [
        (
            HTTP_SOURCE.replace("items = \"/posts\"", "items = \"posts\""),
            vec!["config.toml:15:", "`sources.s.items`", "pointer", "hint: pointers are RFC 6901"],
        ),
        (
            HTTP_SOURCE.replace("kind = \"none\"", "kind = \"scroll\""),
            vec!["config.toml:17:", "`sources.s.pagination", "scroll", "hint:"],
        ),
        (
            HTTP_SOURCE.replace("watermark = \"created_at\"\n", ""),
            vec!["config.toml:10:", "`sources.s`", "watermark", "hint:"],
        ),
    ] {
        let setup = Setup::new();
        setup.write_config(&config(&mistake));
        let output = setup.run(&["check"], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{stderr}");
        for fragment in fragments {
            assert!(stderr.contains(fragment), "missing {fragment:?} in:\n{stderr}");
        }
    }
}

/// Every source example of the README checks clean: the examples work.
#[test]
fn the_readme_source_examples_check_clean() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.trim_start().starts_with("[sources."))
        .collect();
    assert!(blocks.len() >= 3, "the README's source examples were not found");
    let sources = blocks.concat();
    let names: Vec<&str> = sources
        .lines()
        .filter_map(|line| line.strip_prefix("[sources.")?.split(']').next())
        .filter(|name| !name.contains('.'))
        .collect();
    for kind in ["discourse", "reddit", "x", "zendesk", "freshdesk", "intercom", "http"] {
        assert!(sources.contains(&format!("type = \"{kind}\"")), "no README example of `{kind}`");
    }
    let setup = Setup::new();
    setup.write_config(&format!(
        "[daemon]\nstate = \"sqlite://{{dir}}/state.db\"\n[crm]\ntype = \"file\"\npath = \"{{dir}}/crm.json\"\n{sources}"
    ));
    // Every secret the examples reference, set.
    let credentials = setup.path("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    let mut env: Vec<(String, String)> = vec![("CREDENTIALS_DIRECTORY".into(), credentials.display().to_string())];
    for (marker, is_env) in [("env = \"", true), ("file = \"", false)] {
        for piece in sources.split(marker).skip(1) {
            let name = piece.split('"').next().unwrap();
            if is_env {
                env.push((name.to_owned(), "example-secret".into()));
            } else {
                std::fs::write(credentials.join(name), "example-secret\n").unwrap();
            }
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let output = setup.run(&["check"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("{} source(s)", names.len())), "{stdout}");
}

/// Every CRM example of the README checks clean with the demo source.
#[test]
fn the_readme_crm_examples_check_clean() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.trim_start().starts_with("[crm]"))
        .collect();
    for kind in ["salesforce", "pipedrive", "twenty", "webhook", "dynamics", "zoho", "bottlecrm"] {
        assert!(blocks.iter().any(|b| b.contains(&format!("type = \"{kind}\""))), "no README example of `{kind}`");
    }
    for block in blocks {
        let setup = Setup::new();
        setup.write_config(&format!(
            "[daemon]\nstate = \"sqlite://{{dir}}/state.db\"\n{block}\n[sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n"
        ));
        let env: Vec<(&str, &str)> = block
            .split("env = \"")
            .skip(1)
            .map(|piece| piece.split('"').next().unwrap())
            .map(|name| match name.ends_with("_URL") {
                true => (name, "https://hooks.example.com/services/T000/B000/an-example-secret"),
                false => (name, "an-example-secret-of-some-length"),
            })
            .collect();
        let output = setup.run(&["check"], &env);
        assert!(output.status.success(), "{block}\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// An alert rule's mistakes are reported at their line, and its webhook address never shows.
#[test]
fn alert_rule_mistakes_are_reported_at_their_line() {
    let setup = Setup::new();
    setup.write_config(
        "[daemon]\nstate = \"sqlite://{dir}/state.db\"\n[crm]\ntype = \"file\"\npath = \"{dir}/crm.json\"\n\
         [sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n\
         [alerts.angry]\ndestination = \"slack\"\nurl = { env = \"HOOK_URL\" }\nsentiment_below = 2.5\n",
    );
    let output = setup.run(&["check"], &[("HOOK_URL", "https://hooks.slack.com/services/T0/B0/sekrit-token")]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.toml:12:1: `alerts.angry.sentiment_below`"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(!stderr.contains("sekrit"), "{stderr}");

    setup.write_config(
        "[daemon]\nstate = \"sqlite://{dir}/state.db\"\n[crm]\ntype = \"file\"\npath = \"{dir}/crm.json\"\n\
         [sources.demo]\ntype = \"demo\"\nschedule = \"every 2m\"\n\
         [alerts.angry]\ndestination = \"pager\"\nurl = { env = \"HOOK_URL\" }\n",
    );
    let output = setup.run(&["check"], &[("HOOK_URL", "https://hooks.slack.com/services/T0/B0/sekrit-token")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.toml:10:") && stderr.contains("pager"), "{stderr}");
}
