//! The classes a load run drives, their time-per-output-token deadlines, the `--mix` of classes
//! (fractions adding up to 1) and how a mix becomes one class per user.

use anyhow::bail;
use djinn_client::Qos;

/// A realtime request violates its SLA when its own TPOT p99 exceeds this (issue 12: a
/// `deadline_ms` ≤ 25 maps to realtime).
pub const REALTIME_TPOT_DEADLINE_MS: f64 = 25.0;
/// An interactive request's TPOT p99 deadline (≤ 250 ms maps to interactive).
pub const INTERACTIVE_TPOT_DEADLINE_MS: f64 = 250.0;
/// How far the fractions may miss 1 (decimal fractions such as 0.1 are inexact in binary).
const MIX_SUM_TOLERANCE: f64 = 1e-6;

/// A class a load run drives, in priority order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Realtime,
    Interactive,
    Batch,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Realtime, Class::Interactive, Class::Batch];

    pub fn name(self) -> &'static str {
        self.qos().name()
    }

    pub fn qos(self) -> Qos {
        match self {
            Class::Realtime => Qos::Realtime,
            Class::Interactive => Qos::Interactive,
            Class::Batch => Qos::Batch,
        }
    }

    /// The TPOT p99 past which a request of this class is an SLA violation (`None`: no deadline).
    pub fn tpot_deadline_ms(self) -> Option<f64> {
        match self {
            Class::Realtime => Some(REALTIME_TPOT_DEADLINE_MS),
            Class::Interactive => Some(INTERACTIVE_TPOT_DEADLINE_MS),
            Class::Batch => None,
        }
    }

    fn parse(s: &str) -> anyhow::Result<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            anyhow::anyhow!("--mix: unknown class {s:?}: the classes are realtime, interactive and batch")
        })
    }
}

/// Fractions of the load per class, adding up to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix(Vec<(Class, f64)>);

impl Mix {
    /// Parses `realtime=0.1,interactive=0.7,batch=0.2` (any order; absent classes get 0).
    pub fn parse(s: &str) -> anyhow::Result<Mix> {
        let mut parts: Vec<(Class, f64)> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, frac)) = item.split_once('=') else {
                bail!("--mix: {item:?} is not CLASS=FRACTION (e.g. realtime=0.1,interactive=0.7,batch=0.2)");
            };
            let class = Class::parse(name.trim())?;
            let frac: f64 = frac
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--mix: {:?} is not a number (in {item:?})", frac.trim()))?;
            if !(0.0..=1.0).contains(&frac) {
                bail!("--mix: {name}={frac} is outside 0..1");
            }
            if parts.iter().any(|(c, _)| *c == class) {
                bail!("--mix: {name} is given twice");
            }
            parts.push((class, frac));
        }
        let sum: f64 = parts.iter().map(|(_, f)| f).sum();
        if (sum - 1.0).abs() > MIX_SUM_TOLERANCE {
            bail!("--mix: the fractions add up to {sum}, not 1 (e.g. realtime=0.1,interactive=0.7,batch=0.2)");
        }
        parts.sort_by_key(|(c, _)| *c);
        Ok(Mix(parts))
    }

    /// Every class with a share above zero, in priority order.
    pub fn classes(&self) -> impl Iterator<Item = (Class, f64)> + '_ {
        self.0.iter().copied().filter(|(_, f)| *f > 0.0)
    }

    /// One class per user: each class gets its share of `users` rounded down, and the users left
    /// over go to the largest remainders (ties to the higher-priority class), so
    /// `realtime=0.0625,batch=0.9375` over 16 users is exactly one realtime user.
    pub fn assign(&self, users: usize) -> Vec<Class> {
        let mut counts: Vec<(Class, usize, f64)> = self
            .classes()
            .map(|(c, f)| {
                let exact = f * users as f64;
                // The tolerance keeps 0.7 × 10 = 6.999… from rounding down to 6.
                let whole = (exact + MIX_SUM_TOLERANCE).floor();
                (c, whole as usize, exact - whole)
            })
            .collect();
        let left = users.saturating_sub(counts.iter().map(|(_, n, _)| n).sum());
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| counts[b].2.total_cmp(&counts[a].2).then(counts[a].0.cmp(&counts[b].0)));
        for &i in order.iter().cycle().take(left) {
            counts[i].1 += 1;
        }
        counts.iter().flat_map(|&(c, n, _)| std::iter::repeat_n(c, n)).collect()
    }

    /// The class of the request whose uniform draw in [0, 1) is `u` (open loop).
    pub fn draw(&self, u: f64) -> Class {
        let mut acc = 0.0;
        let mut last = Class::Interactive;
        for (c, f) in self.classes() {
            acc += f;
            last = c;
            if u < acc {
                return c;
            }
        }
        last
    }

    /// `{"realtime": 0.1, ...}` for results.json, every class named.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for c in Class::ALL {
            let f = self.0.iter().find(|(k, _)| *k == c).map_or(0.0, |(_, f)| *f);
            m.insert(c.name().into(), serde_json::json!(f));
        }
        serde_json::Value::Object(m)
    }
}

/// Parses `--users 1,2,4`: every level at least one user.
pub fn parse_users(levels: &[usize]) -> anyhow::Result<Vec<usize>> {
    if levels.is_empty() {
        bail!("--users: give at least one level, e.g. --users 1,2,4,8,16");
    }
    if let Some(pos) = levels.iter().position(|&u| u == 0) {
        bail!("--users: level {} is 0; every level needs at least one user", pos + 1);
    }
    Ok(levels.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_sorts_and_checks_the_sum() {
        let m = Mix::parse("batch=0.2,realtime=0.1,interactive=0.7").unwrap();
        assert_eq!(m.0, vec![(Class::Realtime, 0.1), (Class::Interactive, 0.7), (Class::Batch, 0.2)]);
        let e = Mix::parse("realtime=0.5,batch=0.2").unwrap_err().to_string();
        assert!(e.contains("add up to 0.7"), "{e}");
        let e = Mix::parse("realtime=0.5,bulk=0.5").unwrap_err().to_string();
        assert!(e.contains("unknown class \"bulk\""), "{e}");
        assert!(Mix::parse("realtime").is_err());
        assert!(Mix::parse("realtime=x").is_err());
        assert!(Mix::parse("realtime=0.5,realtime=0.5").is_err());
        assert!(Mix::parse("realtime=1.5,batch=-0.5").is_err());
    }

    #[test]
    fn users_are_apportioned_by_largest_remainder() {
        let m = Mix::parse("realtime=0.0625,batch=0.9375").unwrap();
        let a = m.assign(16);
        assert_eq!(a.iter().filter(|c| **c == Class::Realtime).count(), 1);
        assert_eq!(a.len(), 16);
        let m = Mix::parse("realtime=0.1,interactive=0.7,batch=0.2").unwrap();
        assert_eq!(m.assign(1), vec![Class::Interactive]);
        assert_eq!(m.assign(10).iter().filter(|c| **c == Class::Interactive).count(), 7);
        for u in 1..70 {
            assert_eq!(m.assign(u).len(), u);
        }
        assert_eq!(m.draw(0.05), Class::Realtime);
        assert_eq!(m.draw(0.5), Class::Interactive);
        assert_eq!(m.draw(0.95), Class::Batch);
    }

    #[test]
    fn zero_users_is_refused() {
        assert!(parse_users(&[1, 0]).unwrap_err().to_string().contains("is 0"));
        assert!(parse_users(&[]).is_err());
    }
}
