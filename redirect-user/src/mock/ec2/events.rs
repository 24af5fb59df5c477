//! The instance events an app's handlers react to, simulated as amazon-ec2-metadata-mock
//! does: a spot interruption notice, a rebalance recommendation, a scheduled maintenance
//! event and the Auto Scaling group's termination. Each appears after a delay set in
//! `[ec2]` (from the daemon's start) or when `redirect simulate EVENT` asks (from then).
//!
//! What the real service serves once an event is there (and 404, unlisted, before):
//! - `spot/instance-action`: `{"action": "terminate", "time": T}`, T two minutes after the
//!   notice; `spot/termination-time`: T;
//! - `events/recommendations/rebalance`: `{"noticeTime": N}`;
//! - `events/maintenance/scheduled`: a list of events with `NotBefore` a week after the
//!   notice, dates as `21 Jan 2019 09:00:43 GMT`;
//! - `autoscaling/target-lifecycle-state`: `InService`, then `Terminated` (only on an
//!   instance of an Auto Scaling group: configured with `asg_termination_after`, or once
//!   simulated).

use std::{
    sync::{PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize;

/// The events that can be simulated, as `redirect simulate` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// `spot/instance-action` and `spot/termination-time`: the two-minute warning.
    SpotInterruption,
    /// `events/recommendations/rebalance`.
    RebalanceRecommendation,
    /// `events/maintenance/scheduled`: a system reboot a week later.
    ScheduledMaintenance,
    /// `autoscaling/target-lifecycle-state` becomes `Terminated`.
    AsgTermination,
}

impl Event {
    pub const ALL: [Event; 4] = [
        Event::SpotInterruption,
        Event::RebalanceRecommendation,
        Event::ScheduledMaintenance,
        Event::AsgTermination,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::SpotInterruption => "spot-interruption",
            Event::RebalanceRecommendation => "rebalance-recommendation",
            Event::ScheduledMaintenance => "scheduled-maintenance",
            Event::AsgTermination => "asg-termination",
        }
    }

    pub fn parse(s: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When each event is (or was) noticed; shared by every view of the instance and kept over
/// reloads.
#[derive(Debug, Default)]
pub struct Schedule(RwLock<[Option<SystemTime>; 4]>);

/// The events noticed by some moment, with their notice times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Active {
    pub spot: Option<SystemTime>,
    pub rebalance: Option<SystemTime>,
    pub maintenance: Option<SystemTime>,
    pub asg_terminated: Option<SystemTime>,
    /// Whether the instance belongs to an Auto Scaling group (its termination is scheduled).
    pub in_asg: bool,
}

impl Active {
    pub fn any(&self) -> bool {
        *self != Active::default()
    }
}

impl Schedule {
    /// Events at `start` plus their configured delays.
    pub fn new(start: SystemTime, delays: &[(Event, Option<Duration>)]) -> Self {
        let schedule = Schedule::default();
        schedule.configure(start, delays);
        schedule
    }

    /// Sets the configured delays (a reload): each event configured is noticed at `start`
    /// plus its delay, unless one was simulated at run time; one no longer configured is
    /// dropped.
    pub fn configure(&self, start: SystemTime, delays: &[(Event, Option<Duration>)]) {
        let mut at = self.0.write().unwrap_or_else(PoisonError::into_inner);
        for &(event, delay) in delays {
            at[event.index()] = delay.map(|d| start + d);
        }
    }

    /// `redirect simulate EVENT --after D`: noticed at `now + after`.
    pub fn trigger(&self, event: Event, now: SystemTime, after: Duration) {
        self.0.write().unwrap_or_else(PoisonError::into_inner)[event.index()] = Some(now + after);
    }

    /// `redirect simulate clear`: no event pending or noticed.
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = [None; 4];
    }

    pub fn active(&self, now: SystemTime) -> Active {
        let at = *self.0.read().unwrap_or_else(PoisonError::into_inner);
        let noticed = |event: Event| at[event.index()].filter(|&t| t <= now);
        Active {
            spot: noticed(Event::SpotInterruption),
            rebalance: noticed(Event::RebalanceRecommendation),
            maintenance: noticed(Event::ScheduledMaintenance),
            asg_terminated: noticed(Event::AsgTermination),
            in_asg: at[Event::AsgTermination.index()].is_some(),
        }
    }
}

/// How long a spot instance has between its notice and its interruption.
pub const SPOT_WARNING: Duration = Duration::from_secs(120);

/// A scheduled event's date as the real service writes it: `21 Jan 2019 09:00:43 GMT`.
pub fn maintenance_date(t: SystemTime) -> String {
    let rfc = humantime::format_rfc3339_seconds(t).to_string(); // 2019-01-21T09:00:43Z
    let (date, time) = rfc.split_once('T').unwrap_or((&rfc, "00:00:00Z"));
    let mut parts = date.split('-');
    let (year, month, day) = (
        parts.next().unwrap_or("1970"),
        parts
            .next()
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(1),
        parts.next().unwrap_or("01"),
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[(month.clamp(1, 12)) - 1];
    format!("{day} {month} {year} {} GMT", time.trim_end_matches('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_appear_at_their_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Schedule::new(
            start,
            &[
                (Event::SpotInterruption, Some(Duration::from_secs(60))),
                (Event::AsgTermination, None),
            ],
        );
        assert_eq!(s.active(start), Active::default());
        let later = start + Duration::from_secs(60);
        assert_eq!(s.active(later).spot, Some(later));
        assert!(!s.active(later).in_asg);
        s.trigger(Event::AsgTermination, later, Duration::ZERO);
        let a = s.active(later);
        assert!(a.in_asg && a.asg_terminated == Some(later));
        s.trigger(
            Event::RebalanceRecommendation,
            later,
            Duration::from_secs(5),
        );
        assert_eq!(s.active(later).rebalance, None);
        s.clear();
        assert!(!s.active(later + Duration::from_secs(9)).any());
    }

    #[test]
    fn dates_as_the_service_writes_them() {
        let t = humantime::parse_rfc3339("2019-01-21T09:00:43Z").unwrap();
        assert_eq!(maintenance_date(t), "21 Jan 2019 09:00:43 GMT");
        assert_eq!(Event::parse("asg-termination"), Some(Event::AsgTermination));
        assert_eq!(Event::parse("nope"), None);
    }
}
