//! Tier 2, the controller service with many nodes: the real `tlm serve` in its namespace
//! against 60 simulated nodes in another ([`towalink_tests::fleetsim`]: one WireGuard session
//! per node through boringtun's noise, the node API as `towalink-node` speaks it, signed
//! replies and bundles verified). Every node takes an activation; a canary site whose nodes
//! roll back stops the rollout, and every other node keeps its version. The same lab with
//! 1,000 nodes is the fleet benchmark (`cargo bench -p towalink-tests --bench fleet -- sim`).

use std::time::Duration;

use towalink_bundle::messages::OrderResult;
use towalink_tests::fleetlab::FleetLab;
use towalink_tests::fleetsim::Fleet;
use towalink_tests::network::{tail, wait_for};

/// The nodes that are not as expected, a few of them, for a failure message.
fn summary(fleet: &Fleet, lab: &FleetLab) -> String {
    let odd: Vec<String> = fleet
        .views()
        .into_iter()
        .filter(|(_, v)| v.errors > 0 || v.active.is_none())
        .take(5)
        .map(|(name, v)| {
            format!(
                "{name}: active {:?}, installed {:?}, {} error(s), last: {:?}",
                v.active, v.installed, v.errors, v.last_error
            )
        })
        .collect();
    format!(
        "{}\ncontroller log:\n{}",
        odd.join("\n"),
        tail(&std::fs::read_to_string(&lab.log).unwrap_or_default(), 20)
    )
}

#[test]
fn a_fleet_takes_an_activation_and_a_failing_canary_stops_the_rollout() {
    let lab = FleetLab::start(6, 10);
    let fleet = lab.fleet();
    let n = fleet.len();
    wait_for(
        Duration::from_secs(180),
        || fleet.count(|v| v.reported.contains_key(&1)) == n,
        || {
            format!(
                "every simulated node to report v1 active (its first version, downloaded): {} of {n}\n{}",
                fleet.count(|v| v.reported.contains_key(&1)),
                summary(fleet, &lab)
            )
        },
    );

    // A new version: every node downloads it and activates it when ordered.
    lab.ctl.ok(&["set", "global", "bird_bgp_hold_time", "12"]);
    lab.ctl.ok(&["commit", "all"]);
    let out = lab.ctl.ok(&["activate", "all", "--timeout", "180"]);
    assert!(
        out.contains(&format!("{n} of {n} node(s) took the version")),
        "{out}\n{}",
        summary(fleet, &lab)
    );
    let activated = |v: &towalink_tests::fleetsim::NodeView, version: u32| {
        v.active == Some(version)
            && v.order_done
                .as_ref()
                .is_some_and(|o| o.version == version && o.result == OrderResult::Activated)
    };
    assert_eq!(fleet.count(|v| activated(v, 2)), n);
    let status: serde_json::Value =
        serde_json::from_str(&lab.ctl.ok(&["status", "--format", "json"])).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), n);
    assert!(
        nodes
            .iter()
            .all(|node| node["reachable"] == true && node["active_version"] == 2),
        "tlm status disagrees with the nodes: {status:#}"
    );

    // A canary site whose nodes roll back the next version: the rollout stops there.
    fleet.set_failing(|name| name.ends_with(".site0"));
    lab.ctl.ok(&["set", "global", "bird_bgp_hold_time", "13"]);
    lab.ctl.ok(&["commit", "all"]);
    let run = lab
        .ctl
        .run(&["activate", "all", "--canary", "site0", "--timeout", "180"]);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert_ne!(run.code, 0, "{said}");
    assert!(
        said.contains(&format!(
            "canary `site0` did not bless the version; {} other node(s) keep their version",
            n - 10
        )),
        "{said}"
    );
    for (name, view) in fleet.views() {
        if name.ends_with(".site0") {
            assert_eq!(view.active, Some(2), "{name} rolled back to v2");
            assert!(
                view.order_done.as_ref().is_some_and(
                    |o| o.version == 3 && matches!(o.result, OrderResult::RolledBack(_))
                ),
                "{name}: {view:?}"
            );
        } else {
            assert!(activated(&view, 2), "{name} was not ordered v3: {view:?}");
            assert!(view.installed.contains(&3), "{name} mirrored v3: {view:?}");
        }
    }
}
