//! The docker-compose stack cannot run on the CI machines (no Docker engine),
//! so this checks what can be checked: the file parses, has the services and
//! healthchecks the README promises, and every env var it sets on a relay is
//! one the relay actually reads.
use std::collections::BTreeSet;
use std::fs;

fn relay_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("src") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = fs::read_to_string(&path).expect("file");
                for part in text.split("env = \"").skip(1) {
                    if let Some(end) = part.find('"') {
                        vars.insert(part[..end].to_string());
                    }
                }
            }
        }
    }
    vars.insert("RUST_LOG".into());
    vars.insert("LOG_FORMAT".into());
    vars
}

#[test]
fn compose_file_is_consistent_with_the_relay() {
    let text = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("compose file");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    doc.apply_merge().expect("merge keys");
    let services = doc["services"].as_mapping().expect("services");
    for name in [
        "postgres", "redis", "kafka", "rabbitmq", "nats", "relay1", "relay2",
    ] {
        let s = &doc["services"][name];
        assert!(s.is_mapping(), "service {name} missing");
        assert!(
            s["healthcheck"]["test"].is_sequence(),
            "service {name} has no healthcheck"
        );
    }
    assert!(
        doc["services"]["kafka"]["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka")
    );
    let known = relay_env_vars();
    let mut relays = 0;
    for (name, s) in services {
        let is_relay = s["build"].as_str() == Some(".");
        if !is_relay {
            continue;
        }
        relays += 1;
        let env = s["environment"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{name:?}: environment"));
        for (k, v) in env {
            let k = k.as_str().expect("env key");
            assert!(
                known.contains(k),
                "{name:?} sets {k}, which the relay does not read"
            );
            assert!(!v.is_null(), "{name:?}: {k} has no value");
        }
        assert!(env.contains_key("BUS") && env.contains_key("DATABASE_URL"));
        // depends_on waits for healthy brokers.
        for dep in ["postgres", "kafka", "redis", "rabbitmq", "nats"] {
            assert_eq!(
                s["depends_on"][dep]["condition"].as_str(),
                Some("service_healthy"),
                "{name:?} -> {dep}"
            );
        }
    }
    assert_eq!(relays, 2, "two relay instances");
    // The Prometheus config scrapes both relays.
    let prom = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus.yml"
    ))
    .expect("prometheus.yml");
    assert!(prom.contains("relay1:8080") && prom.contains("relay2:8080"));
}
