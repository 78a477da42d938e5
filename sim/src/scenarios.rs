//! The scenarios in `sim/scenarios/`, built into the binary so `potluck sim NAME` runs
//! them from anywhere.

/// Every scenario of the folder: name and TOML.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("lan-5", include_str!("../scenarios/lan-5.toml")),
    ("city-500", include_str!("../scenarios/city-500.toml")),
    (
        "internet-10k",
        include_str!("../scenarios/internet-10k.toml"),
    ),
    (
        "mass-departure",
        include_str!("../scenarios/mass-departure.toml"),
    ),
    ("sybil-wave", include_str!("../scenarios/sybil-wave.toml")),
    ("cheaters", include_str!("../scenarios/cheaters.toml")),
    ("detection", include_str!("../scenarios/detection.toml")),
    ("failover-3", include_str!("../scenarios/failover-3.toml")),
];

/// The built-in scenario `name`'s TOML.
pub fn built_in(name: &str) -> Option<&'static str> {
    BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
