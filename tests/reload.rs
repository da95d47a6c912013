//! Reloading the configuration with work in flight: GPUs come and go and slot counts change without
//! losing or re-dispatching a task.

mod common;

use std::time::Duration;

use common::{stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};

#[test]
fn gpus_and_slots_change_under_load_without_touching_tasks_in_flight() {
    let env = TestEnv::new("reload");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_millis(400), Duration::from_millis(400)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let urls = fleet.urls();
    // Start with g0 alone.
    let daemon = env.start(&env.config_toml(&urls[..1], ""));
    env.push_raw("q1", &transcriptions("rl", 40));
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().running(0) == 4
    }));
    // g0 down to one slot, g1 joins with two: the four running on g0 go on, two of them drain.
    let both = env
        .config_toml(urls, "")
        .replacen("id = \"g0\"\n", "id = \"g0\"\nslots = 1\n", 1)
        .replacen("id = \"g1\"\n", "id = \"g1\"\nslots = 2\n", 1);
    daemon.apply_config(env.config(&both));
    {
        let view = daemon.slots();
        assert_eq!((view[0].slots, view[1].slots), (1, 2));
        assert_eq!(view[0].cells.iter().filter(|c| c.is_some()).count(), 4);
    }
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().received(1) > 0
    }));
    // Once the two beyond the new count have drained, g0 runs at most one at a time.
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().running(0) <= 1
    }));
    fleet.stats().reset_max_running(0);
    let g0_then = fleet.stats().received(0);
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().received(0) >= g0_then + 3
    }));
    assert!(
        fleet.stats().max_running(0) <= 1,
        "g0 ran {} at once after its slots were lowered to 1",
        fleet.stats().max_running(0)
    );
    // Then g0 is removed: it drains, everything else goes to g1.
    let only_g1 = env
        .config_toml(&urls[1..], "")
        .replace("id = \"g0\"", "id = \"g1\"")
        .replacen("id = \"g1\"\n", "id = \"g1\"\nslots = 2\n", 1);
    let g0_before = fleet.stats().received(0);
    daemon.apply_config(env.config(&only_g1));
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == 40),
        "{:?}",
        env.states()
    );
    // Nothing was lost or dispatched twice, and g0 took at most what it had claimed before.
    assert_eq!(env.count("attempts = 1"), 40);
    assert!(fleet.stats().seen().values().all(|&n| n == 1));
    assert!(fleet.stats().received(0) <= g0_before + 1);
    assert!(fleet.stats().max_running(1) <= 2);
    let view = daemon.slots();
    assert!(view[0].retired && view[0].cells.is_empty());
    stop(daemon);
}
