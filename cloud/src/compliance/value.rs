//! What a slot declares and whether it may be declared: the values built from stored telemetry
//! (formatted exactly as the MEE API takes them) and the checks that hold a suspicious slot for
//! review instead of declaring nonsense. Nothing here is invented or clipped: a value that
//! cannot be built is a hold with its reason, never a guess. Pure functions; the telemetry they
//! read is gathered by the submitter (`submitter::inputs`).
//!
//! Values (`docs/compliance.md`):
//!
//! - `caudal`, L/s with 2 decimals: the flow sample at the slot instant (`sample`) or the mean
//!   over the period ending at the slot from the totalizer delta (`mean`). Default: `sample` for
//!   hourly slots (what the manual's examples and operators in production send), `mean` for
//!   daily and longer ones, where one instant says nothing about a day or a month.
//! - `totalizador`, the totalizer in whole m³, truncated (never rounded up past what was read),
//!   at most 15 characters.
//! - `nivelFreaticoDelPozo`, depth to water in m with 2 decimals: the point's level-sensor depth
//!   minus the measured water column, or the level reading itself when no sensor depth is set;
//!   empty for Caudales Muy Pequeños, which have no level sensor.
//! - `alturaLimnimetrica`, gauge height in whole cm (rounded), empty for Caudales Muy Pequeños.

use super::dga::Endpoint;
use super::slot::Period;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Longest `totalizador` the MEE API takes, characters.
pub const MAX_TOTALIZER_CHARS: usize = 15;
/// Flow limit when the point's authorized flow is unknown, L/s (research notes §9.7).
pub const FALLBACK_FLOW_LIMIT_LPS: f64 = 1000.0;
/// Tolerance above the authorized flow before a slot is held.
pub const AUTHORIZED_TOLERANCE: f64 = 0.10;
/// m³/h read as L/s (or the reverse) multiplies or divides flow by this.
pub const UNIT_FACTOR: f64 = 3.6;
/// How close a flow / mean-flow ratio must be to [`UNIT_FACTOR`] (or its inverse) to be held.
pub const UNIT_FACTOR_TOLERANCE: f64 = 0.15;

/// How `caudal` is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowMethod {
    /// The flow sample at the slot instant.
    Sample,
    /// The mean over the period ending at the slot, from the totalizer delta.
    Mean,
}

impl FlowMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowMethod::Sample => "sample",
            FlowMethod::Mean => "mean",
        }
    }

    /// The default for a period (see the module doc).
    pub fn default_for(p: Period) -> FlowMethod {
        match p {
            Period::Hourly => FlowMethod::Sample,
            _ => FlowMethod::Mean,
        }
    }
}

impl FromStr for FlowMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<FlowMethod, String> {
        match s {
            "sample" => Ok(FlowMethod::Sample),
            "mean" => Ok(FlowMethod::Mean),
            other => Err(format!("unknown flow method {other:?}")),
        }
    }
}

/// What stored telemetry says about one slot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Flow at the slot instant, L/s.
    pub flow: Option<f64>,
    /// Totalizer at the slot instant, m³.
    pub total: Option<f64>,
    /// Totalizer at the previous slot instant, m³.
    pub total_prev: Option<f64>,
    /// Level reading at the slot instant, m (a water column or a depth, see the module doc).
    pub level: Option<f64>,
    /// A totalizer-backwards event (reset, replacement, rollover) between the two slots.
    pub backwards_event: Option<String>,
}

/// How a point's slots are built and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub endpoint: Endpoint,
    pub period: Period,
    pub method: FlowMethod,
    /// Seconds from the previous slot to this one.
    pub slot_seconds: f64,
    pub low_flow_lps: f64,
    pub authorized_flow_lps: Option<f64>,
    pub level_sensor_depth_m: Option<f64>,
    /// Caudales Muy Pequeños: `nivel` / `altura` are sent empty.
    pub level_optional: bool,
}

/// A slot's values, as the MEE API takes them (every value a string).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Values {
    pub caudal: String,
    pub totalizador: Option<String>,
    pub nivel: Option<String>,
    pub altura: Option<String>,
}

/// Why a slot is held for review instead of being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// A value the endpoint needs has no reading for the slot.
    NoData,
    /// Flow and totalizer delta differ by the m³/h-as-L/s factor 3.6 (either way).
    UnitMismatch,
    NegativeFlow,
    /// Flow above 0 but below the low-flow cut-off: zero-point drift.
    LowFlowNoise,
    AboveAuthorized,
    /// Totalizer unchanged over the slot while flow > 0.
    TotalizerFrozen,
    /// Totalizer went down (reset, replacement, rollover).
    TotalizerBackwards,
    /// A value cannot be written in the API's format (too long, level deeper than the sensor).
    Unrepresentable,
}

impl HoldReason {
    pub const ALL: [HoldReason; 8] = [
        HoldReason::NoData,
        HoldReason::UnitMismatch,
        HoldReason::NegativeFlow,
        HoldReason::LowFlowNoise,
        HoldReason::AboveAuthorized,
        HoldReason::TotalizerFrozen,
        HoldReason::TotalizerBackwards,
        HoldReason::Unrepresentable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::NoData => "no_data",
            HoldReason::UnitMismatch => "unit_mismatch",
            HoldReason::NegativeFlow => "negative_flow",
            HoldReason::LowFlowNoise => "low_flow_noise",
            HoldReason::AboveAuthorized => "above_authorized",
            HoldReason::TotalizerFrozen => "totalizer_frozen",
            HoldReason::TotalizerBackwards => "totalizer_backwards",
            HoldReason::Unrepresentable => "unrepresentable",
        }
    }

    pub fn parse(s: &str) -> Option<HoldReason> {
        HoldReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A hold: its reason and what was seen, for the person who reviews it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub reason: HoldReason,
    pub detail: String,
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

fn hold(reason: HoldReason, detail: impl Into<String>) -> Hold {
    Hold {
        reason,
        detail: detail.into(),
    }
}

fn mean_flow(i: &Inputs, r: &Rules) -> Option<f64> {
    match (i.total, i.total_prev) {
        (Some(t), Some(p)) if r.slot_seconds > 0.0 => Some((t - p) * 1000.0 / r.slot_seconds),
        _ => None,
    }
}

/// The values of a slot, or the hold that stops it when one cannot be built.
pub fn values(i: &Inputs, r: &Rules) -> Result<Values, Hold> {
    let flow = match r.method {
        FlowMethod::Sample => i
            .flow
            .ok_or_else(|| hold(HoldReason::NoData, "caudal: no flow reading at the slot"))?,
        FlowMethod::Mean => mean_flow(i, r).ok_or_else(|| {
            hold(
                HoldReason::NoData,
                "caudal: the mean needs the totalizer at this slot and the previous one",
            )
        })?,
    };
    if !flow.is_finite() {
        return Err(hold(HoldReason::Unrepresentable, format!("caudal: {flow}")));
    }
    let caudal = format!("{flow:.2}");
    let needs_total = matches!(
        r.endpoint,
        Endpoint::Subterranea | Endpoint::SuperficialFlujometro
    );
    let totalizador = match (needs_total, i.total) {
        (false, _) => None,
        (true, None) => {
            return Err(hold(
                HoldReason::NoData,
                "totalizador: no totalizer reading at the slot",
            ));
        }
        (true, Some(t)) => {
            if !t.is_finite() || t < 0.0 {
                return Err(hold(
                    HoldReason::Unrepresentable,
                    format!("totalizador: {t}"),
                ));
            }
            let s = format!("{}", t.trunc() as u64);
            if s.len() > MAX_TOTALIZER_CHARS {
                return Err(hold(
                    HoldReason::Unrepresentable,
                    format!("totalizador: {s} is longer than {MAX_TOTALIZER_CHARS} characters"),
                ));
            }
            Some(s)
        }
    };
    let level = |name: &str| -> Result<Option<f64>, Hold> {
        match i.level {
            Some(l) => Ok(Some(l)),
            None if r.level_optional => Ok(None),
            None => Err(hold(
                HoldReason::NoData,
                format!("{name}: no level reading at the slot"),
            )),
        }
    };
    let mut nivel = None;
    let mut altura = None;
    match r.endpoint {
        Endpoint::Subterranea => {
            nivel = Some(match level("nivelFreaticoDelPozo")? {
                None => String::new(),
                Some(l) => {
                    let depth = match r.level_sensor_depth_m {
                        Some(d) => d - l,
                        None => l,
                    };
                    if !depth.is_finite() || depth < 0.0 {
                        return Err(hold(
                            HoldReason::Unrepresentable,
                            format!(
                                "nivelFreaticoDelPozo: depth to water {depth:.2} m (sensor depth \
                                 {:?} m, reading {l} m) is above the reference point",
                                r.level_sensor_depth_m
                            ),
                        ));
                    }
                    format!("{depth:.2}")
                }
            });
        }
        Endpoint::Superficial => {
            altura = Some(match level("alturaLimnimetrica")? {
                None => String::new(),
                Some(l) if l.is_finite() && l >= 0.0 => format!("{}", (l * 100.0).round() as u64),
                Some(l) => {
                    return Err(hold(
                        HoldReason::Unrepresentable,
                        format!("alturaLimnimetrica: {l} m"),
                    ));
                }
            });
        }
        Endpoint::SuperficialFlujometro => {}
    }
    Ok(Values {
        caudal,
        totalizador,
        nivel,
        altura,
    })
}

/// The first suspicious thing about a slot whose values could be built, if any.
pub fn check(i: &Inputs, r: &Rules) -> Option<Hold> {
    if let Some(kind) = &i.backwards_event {
        return Some(hold(
            HoldReason::TotalizerBackwards,
            format!("a {kind} event since the previous slot"),
        ));
    }
    if let (Some(t), Some(p)) = (i.total, i.total_prev)
        && t < p
    {
        return Some(hold(
            HoldReason::TotalizerBackwards,
            format!("totalizer {t} m³ is below the previous slot's {p} m³"),
        ));
    }
    let mean = mean_flow(i, r);
    let flow = match r.method {
        FlowMethod::Sample => i.flow,
        FlowMethod::Mean => mean,
    }?;
    if flow < 0.0 {
        return Some(hold(HoldReason::NegativeFlow, format!("flow {flow} L/s")));
    }
    if flow > 0.0 && flow < r.low_flow_lps {
        return Some(hold(
            HoldReason::LowFlowNoise,
            format!(
                "flow {flow} L/s is below the low-flow cut-off {} L/s",
                r.low_flow_lps
            ),
        ));
    }
    let limit = r.authorized_flow_lps.map_or(FALLBACK_FLOW_LIMIT_LPS, |a| {
        a * (1.0 + AUTHORIZED_TOLERANCE)
    });
    if flow > limit {
        return Some(hold(
            HoldReason::AboveAuthorized,
            format!(
                "flow {flow} L/s is above {limit:.2} L/s ({})",
                match r.authorized_flow_lps {
                    Some(a) =>
                        format!("authorized {a} L/s + {:.0} %", AUTHORIZED_TOLERANCE * 100.0),
                    None => "no authorized flow set: the sanity limit".to_string(),
                }
            ),
        ));
    }
    if let (Some(sample), Some(mean), Period::Hourly) = (i.flow, mean, r.period)
        && sample >= r.low_flow_lps
        && mean >= r.low_flow_lps
    {
        let ratio = sample / mean;
        let near = |target: f64| ((ratio - target) / target).abs() < UNIT_FACTOR_TOLERANCE;
        if near(UNIT_FACTOR) || near(1.0 / UNIT_FACTOR) {
            return Some(hold(
                HoldReason::UnitMismatch,
                format!(
                    "flow {sample} L/s against {mean:.2} L/s from the totalizer delta: a factor \
                     of {ratio:.2} (m³/h declared as L/s, or the reverse)"
                ),
            ));
        }
    }
    if let (Some(t), Some(p), Some(sample)) = (i.total, i.total_prev, i.flow) {
        let expected_m3 = sample * r.slot_seconds / 1000.0;
        if t == p && sample >= r.low_flow_lps && expected_m3 >= 1.0 {
            return Some(hold(
                HoldReason::TotalizerFrozen,
                format!(
                    "totalizer unchanged at {t} m³ while flow is {sample} L/s (≈ {expected_m3:.0} \
                     m³ expected)"
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well() -> Rules {
        Rules {
            endpoint: Endpoint::Subterranea,
            period: Period::Hourly,
            method: FlowMethod::Sample,
            slot_seconds: 3600.0,
            low_flow_lps: 0.2,
            authorized_flow_lps: Some(20.0),
            level_sensor_depth_m: Some(30.0),
            level_optional: false,
        }
    }

    fn pumping() -> Inputs {
        // 10 L/s for an hour is 36 m³.
        Inputs {
            flow: Some(10.0),
            total: Some(1046.9),
            total_prev: Some(1010.9),
            level: Some(20.15),
            backwards_event: None,
        }
    }

    #[test]
    fn values_are_formatted_as_the_manual_writes_them() {
        let v = values(&pumping(), &well()).expect("values");
        assert_eq!(v.caudal, "10.00");
        assert_eq!(
            v.totalizador.as_deref(),
            Some("1046"),
            "truncated, not rounded"
        );
        assert_eq!(
            v.nivel.as_deref(),
            Some("9.85"),
            "30 m sensor, 20.15 m column"
        );
        assert_eq!(v.altura, None);
        assert_eq!(check(&pumping(), &well()), None);
        let mean = values(
            &pumping(),
            &Rules {
                method: FlowMethod::Mean,
                ..well()
            },
        )
        .expect("mean");
        assert_eq!(mean.caudal, "10.00");
        let cmp = Rules {
            level_optional: true,
            ..well()
        };
        let v = values(
            &Inputs {
                level: None,
                ..pumping()
            },
            &cmp,
        )
        .expect("cmp");
        assert_eq!(v.nivel.as_deref(), Some(""));
        let gauge = Rules {
            endpoint: Endpoint::Superficial,
            ..well()
        };
        let v = values(
            &Inputs {
                level: Some(0.054),
                total: None,
                ..pumping()
            },
            &gauge,
        )
        .expect("gauge");
        assert_eq!((v.altura.as_deref(), v.totalizador), (Some("5"), None));
        let big = Inputs {
            total: Some(1e16),
            ..pumping()
        };
        assert_eq!(
            values(&big, &well()).map_err(|h| h.reason),
            Err(HoldReason::Unrepresentable)
        );
    }

    #[test]
    fn missing_readings_hold_the_slot_naming_the_value() {
        for (i, field) in [
            (
                Inputs {
                    flow: None,
                    ..pumping()
                },
                "caudal",
            ),
            (
                Inputs {
                    total: None,
                    ..pumping()
                },
                "totalizador",
            ),
            (
                Inputs {
                    level: None,
                    ..pumping()
                },
                "nivelFreaticoDelPozo",
            ),
        ] {
            let h = values(&i, &well()).expect_err(field);
            assert_eq!(h.reason, HoldReason::NoData);
            assert!(h.detail.starts_with(field), "{h}");
        }
    }

    #[test]
    fn suspicious_slots_are_held_with_their_reason() {
        let reason = |i: Inputs| check(&i, &well()).map(|h| h.reason);
        // m³/h declared as L/s: 36 m³/h read as 36 "L/s" against a 10 L/s delta.
        assert_eq!(
            reason(Inputs {
                flow: Some(36.0),
                ..pumping()
            }),
            Some(HoldReason::AboveAuthorized)
        );
        let wide = Rules {
            authorized_flow_lps: Some(100.0),
            ..well()
        };
        assert_eq!(
            check(
                &Inputs {
                    flow: Some(36.0),
                    ..pumping()
                },
                &wide
            )
            .map(|h| h.reason),
            Some(HoldReason::UnitMismatch)
        );
        assert_eq!(
            reason(Inputs {
                flow: Some(2.78),
                ..pumping()
            }),
            Some(HoldReason::UnitMismatch)
        );
        assert_eq!(
            reason(Inputs {
                flow: Some(-0.5),
                ..pumping()
            }),
            Some(HoldReason::NegativeFlow)
        );
        assert_eq!(
            reason(Inputs {
                flow: Some(0.05),
                total: Some(1010.9),
                ..pumping()
            }),
            Some(HoldReason::LowFlowNoise)
        );
        assert_eq!(
            reason(Inputs {
                flow: Some(25.0),
                ..pumping()
            }),
            Some(HoldReason::AboveAuthorized)
        );
        assert_eq!(
            reason(Inputs {
                total: Some(1010.9),
                ..pumping()
            }),
            Some(HoldReason::TotalizerFrozen)
        );
        assert_eq!(
            reason(Inputs {
                total: Some(5.0),
                ..pumping()
            }),
            Some(HoldReason::TotalizerBackwards)
        );
        assert_eq!(
            reason(Inputs {
                backwards_event: Some("meter_replaced".into()),
                ..pumping()
            }),
            Some(HoldReason::TotalizerBackwards)
        );
        // A pump that is off: zero flow, unchanged totalizer, nothing to hold.
        assert_eq!(
            reason(Inputs {
                flow: Some(0.0),
                total: Some(1010.9),
                ..pumping()
            }),
            None
        );
        let none = Rules {
            authorized_flow_lps: None,
            ..well()
        };
        assert_eq!(
            check(
                &Inputs {
                    flow: Some(1500.0),
                    ..pumping()
                },
                &none
            )
            .map(|h| h.reason),
            Some(HoldReason::AboveAuthorized)
        );
    }
}
