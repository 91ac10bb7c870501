//! What `bench --repeat` and `--qd` sweeps make of their runs: the runs of one configuration
//! folded into one row (every figure the median of the runs, with its min and max beside it),
//! and ratios between two paths taken only at equal queue depth.

use serde_json::{json, Map, Value};

use super::table::round3;

/// A figure over the runs of one configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Median (the mean of the middle two for an even count), min and max; `None` for no values.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => return None,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// An integer figure stays an integer (rounded: the median of two counts can end in .5, and
/// the rounded value still lies between them); others keep three decimals.
fn number(x: f64, integral: bool) -> Value {
    if integral {
        json!(x.round() as u64)
    } else {
        json!(round3(x))
    }
}

/// Folds the rows of the runs of one configuration into one: each number that every run has
/// becomes the median, with `min` and `max` objects holding the extremes under the same keys;
/// `runs` is how many there were. Everything else (status, error reason, backend, counters
/// that are not plain numbers) is the first failed run's, or the first run's when all passed:
/// a failure and its reason are never hidden behind a median.
pub fn fold(runs: &[Value]) -> Value {
    let Some(first) = runs.first().and_then(Value::as_object) else {
        return Value::Null;
    };
    let shown = runs
        .iter()
        .find(|r| r["status"] == "fail")
        .and_then(Value::as_object)
        .unwrap_or(first);
    let (mut out, mut min, mut max) = (Map::new(), Map::new(), Map::new());
    for (key, value) in first {
        let numbers: Option<Vec<f64>> = runs.iter().map(|r| r[key].as_f64()).collect();
        let integral = runs.iter().all(|r| r[key].is_u64());
        match numbers
            .as_deref()
            .filter(|_| value.is_number())
            .and_then(spread)
        {
            Some(s) => {
                out.insert(key.clone(), number(s.median, integral));
                min.insert(key.clone(), number(s.min, integral));
                max.insert(key.clone(), number(s.max, integral));
            }
            None => {
                let shown = shown.get(key).unwrap_or(value);
                out.insert(key.clone(), shown.clone());
            }
        }
    }
    out.insert("runs".into(), json!(runs.len()));
    out.insert("min".into(), Value::Object(min));
    out.insert("max".into(), Value::Object(max));
    Value::Object(out)
}

/// The figures compared between two paths (for latencies, lower is better: below 1 wins).
pub const COMPARED: [&str; 6] = [
    "iops",
    "mb_per_s",
    "lat_mean_us",
    "lat_p50_us",
    "lat_p99_us",
    "lat_p999_us",
];

/// Ours over theirs for every compared figure either has (`null` where theirs is 0 or missing).
pub fn ratios(ours: &Value, theirs: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for key in COMPARED {
        if ours.get(key).is_none() && theirs.get(key).is_none() {
            continue;
        }
        let r = match (ours[key].as_f64(), theirs[key].as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
            _ => None,
        };
        out.insert(key.to_string(), json!(r));
    }
    out
}

/// For each result of path `ours` that has a result of path `theirs` at the same queue depth,
/// one object `{ours, theirs, qd, <figure>: ratio ...}`. Results at different queue depths are
/// never compared: a deeper queue buys throughput the other path never had the chance to use.
pub fn matched_ratios(results: &[Value], ours: &str, theirs: &str) -> Vec<Value> {
    let at = |path: &str, qd: &Value| {
        results
            .iter()
            .find(|r| r["path"] == path && r["qd"] == *qd && !qd.is_null())
    };
    results
        .iter()
        .filter(|r| r["path"] == ours)
        .filter_map(|o| at(theirs, &o["qd"]).map(|t| (o, t)))
        .map(|(o, t)| {
            let mut ratio = Map::new();
            ratio.insert("ours".into(), json!(ours));
            ratio.insert("theirs".into(), json!(theirs));
            ratio.insert("qd".into(), o["qd"].clone());
            ratio.extend(ratios(o, t));
            Value::Object(ratio)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_and_the_ends() {
        let s = spread(&[5.0, 1.0, 3.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        let s = spread(&[4.0, 1.0, 2.0, 10.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(spread(&[7.5]).map(|s| s.median), Some(7.5));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn fold_keeps_every_field_and_adds_min_max_runs() {
        let runs = [
            json!({"status": "pass", "iops": 100, "lat_p50_us": 2.5, "backend": "a", "x": null}),
            json!({"status": "pass", "iops": 301, "lat_p50_us": 1.5, "backend": "a", "x": null}),
            json!({"status": "pass", "iops": 200, "lat_p50_us": 9.0, "backend": "a", "x": null}),
        ];
        let row = fold(&runs);
        assert_eq!(row["iops"], json!(200));
        assert_eq!(row["lat_p50_us"], json!(2.5));
        assert_eq!(
            (&row["min"]["iops"], &row["max"]["iops"]),
            (&json!(100), &json!(301))
        );
        assert_eq!(row["min"]["lat_p50_us"], json!(1.5));
        assert_eq!(row["max"]["lat_p50_us"], json!(9.0));
        assert_eq!((&row["runs"], &row["status"]), (&json!(3), &json!("pass")));
        assert_eq!((&row["backend"], &row["x"]), (&json!("a"), &Value::Null));
        assert!(row["min"].get("backend").is_none());
    }

    #[test]
    fn an_even_count_rounds_integers_between_the_two() {
        let row = fold(&[json!({"iops": 3}), json!({"iops": 4})]);
        let (min, median, max) = (&row["min"]["iops"], &row["iops"], &row["max"]["iops"]);
        assert!(median.is_u64(), "{row}");
        assert!(min.as_u64() <= median.as_u64() && median.as_u64() <= max.as_u64());
        assert_eq!(row["runs"], json!(2));
    }

    #[test]
    fn a_failed_run_shows_with_its_reason() {
        let row = fold(&[
            json!({"status": "pass", "error": null, "iops": 10}),
            json!({"status": "fail", "error": "bs too big", "iops": 0}),
        ]);
        assert_eq!(row["status"], "fail");
        assert_eq!(row["error"], "bs too big");
        // A figure one run lacks is not folded: the failed run's value is shown.
        let row = fold(&[json!({"lat": 1.0}), json!({"lat": null, "status": "fail"})]);
        assert_eq!(row["lat"], Value::Null);
        assert_eq!(fold(&[]), Value::Null);
    }

    #[test]
    fn ratios_are_taken_at_equal_queue_depth_only() {
        let results = [
            json!({"path": "virtio", "qd": 1, "mb_per_s": 20.0, "iops": 5000}),
            json!({"path": "virtio", "qd": 32, "mb_per_s": 400.0, "iops": 100000}),
            json!({"path": "ata", "qd": 1, "mb_per_s": 10.0, "iops": 2500}),
        ];
        let r = matched_ratios(&results, "virtio", "ata");
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!((&r[0]["qd"], &r[0]["mb_per_s"]), (&json!(1), &json!(2.0)));
        assert_eq!(r[0]["iops"], json!(2.0));
        assert!(r[0].get("lat_p99_us").is_none(), "neither has it");
        // Without a common queue depth there is no ratio at all.
        assert!(matched_ratios(&results[1..], "virtio", "ata").is_empty());
        // Rows without a queue depth (network) are never matched.
        let net = [
            json!({"path": "a", "qd": null}),
            json!({"path": "b", "qd": null}),
        ];
        assert!(matched_ratios(&net, "a", "b").is_empty());
    }

    #[test]
    fn a_zero_or_missing_figure_gives_no_ratio() {
        let r = ratios(
            &json!({"iops": 300.0, "lat_mean_us": 10.0}),
            &json!({"iops": 100.0, "lat_mean_us": 0.0}),
        );
        assert_eq!(r["iops"], json!(3.0));
        assert_eq!(r["lat_mean_us"], Value::Null);
    }
}
