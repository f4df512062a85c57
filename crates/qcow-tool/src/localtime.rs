//! Local time as qemu-img prints snapshot dates (`localtime` then `strftime("%Y-%m-%d %H:%M:%S")`), without
//! unsafe code: the zone is found as the C library finds it and read from its TZif file.
//!
//! `TZ` unset: `/etc/localtime`. `TZ` empty or naming no readable zone file: the POSIX rule it spells (so
//! `UTC0` or `CET-1CEST,M3.5.0,M10.5.0/3` work without a file), or UTC. Otherwise the TZif file at `TZ` (an
//! absolute path) or under `/usr/share/zoneinfo`, a leading `:` dropped. Times after the file's last transition
//! follow the rule in its footer, as the C library does. Anything unreadable falls back to UTC: a date is shown
//! either way.

use std::path::PathBuf;

/// A time zone: transitions (UTC seconds, offset in effect from then), the offset before the first one, and the
/// rule for times after the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Zone {
    transitions: Vec<(i64, i64)>,
    initial: i64,
    rule: Option<Rule>,
}

/// A POSIX TZ rule: standard offset (seconds east of UTC), and daylight saving time with its start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    std: i64,
    dst: Option<(i64, Change, Change)>,
}

/// When daylight saving time starts or ends: a day of the year and the local time of day (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Day {
    /// `Jn`: day 1..=365, February 29 never counted.
    Julian(i64),
    /// `n`: day 0..=365, February 29 counted in leap years.
    Zero(i64),
    /// `Mm.w.d`: weekday d (0 Sunday) of week w (5 the last) of month m.
    Month(i64, i64, i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    day: Day,
    time: i64,
}

/// `secs` (since the epoch, UTC) as "YYYY-MM-DD HH:MM:SS" in the local time zone.
pub fn format(secs: i64) -> String {
    let local = secs.saturating_add(current_zone().offset_at(secs));
    let (year, month, day) = civil_from_days(local.div_euclid(86_400));
    let rest = local.rem_euclid(86_400);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, (rest / 60) % 60, rest % 60)
}

fn current_zone() -> Zone {
    let utc = Zone { transitions: Vec::new(), initial: 0, rule: None };
    let tz = std::env::var("TZ").ok();
    let path = match tz.as_deref() {
        None => PathBuf::from("/etc/localtime"),
        Some(spec) => {
            let name = spec.strip_prefix(':').unwrap_or(spec);
            if name.is_empty() {
                return utc;
            }
            let file = if name.starts_with('/') {
                PathBuf::from(name)
            } else {
                ["/usr/share/zoneinfo", name].iter().collect()
            };
            if !file.is_file() {
                return parse_rule(name).map_or(utc, |rule| Zone {
                    transitions: Vec::new(),
                    initial: rule.std,
                    rule: Some(rule),
                });
            }
            file
        }
    };
    std::fs::read(path).ok().and_then(|bytes| parse_tzif(&bytes)).unwrap_or(utc)
}

impl Zone {
    fn offset_at(&self, t: i64) -> i64 {
        match self.transitions.iter().rposition(|&(at, _)| at <= t) {
            None => match (&self.rule, self.transitions.is_empty()) {
                (Some(rule), true) => rule.offset_at(t),
                _ => self.initial,
            },
            Some(i) if i + 1 == self.transitions.len() && self.rule.is_some() => {
                self.rule.as_ref().map_or(0, |r| r.offset_at(t))
            }
            Some(i) => self.transitions.get(i).map_or(self.initial, |&(_, off)| off),
        }
    }
}

impl Rule {
    fn offset_at(&self, t: i64) -> i64 {
        let Some((dst, start, end)) = self.dst else { return self.std };
        // The year as seen in standard time; the changes are given in local time (start in standard time, end
        // in daylight time).
        let (year, _, _) = civil_from_days((t + self.std).div_euclid(86_400));
        let begins = start.utc(year, self.std);
        let ends = end.utc(year, dst);
        let in_dst = if begins < ends { t >= begins && t < ends } else { t >= begins || t < ends };
        if in_dst {
            dst
        } else {
            self.std
        }
    }
}

impl Change {
    /// The UTC second at which this change happens in `year`, for a zone `offset` seconds east of UTC before it.
    fn utc(self, year: i64, offset: i64) -> i64 {
        let jan1 = days_from_civil(year, 1, 1);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let day = match self.day {
            Day::Julian(n) => jan1 + n - 1 + i64::from(leap && n >= 60),
            Day::Zero(n) => jan1 + n,
            Day::Month(m, w, d) => {
                let first = days_from_civil(year, m, 1);
                // 1970-01-01 was a Thursday (4).
                let weekday = (first + 4).rem_euclid(7);
                let mut day = first + (d - weekday).rem_euclid(7) + (w - 1) * 7;
                let next_month =
                    if m == 12 { days_from_civil(year + 1, 1, 1) } else { days_from_civil(year, m + 1, 1) };
                while day >= next_month {
                    day -= 7;
                }
                day
            }
        };
        day * 86_400 + self.time - offset
    }
}

/// Reads a TZif file (RFC 8536): the 64-bit data of version 2 and later, else version 1's, and the footer rule.
fn parse_tzif(bytes: &[u8]) -> Option<Zone> {
    let header = |at: usize| -> Option<[usize; 6]> {
        if bytes.get(at..at + 4)? != b"TZif" {
            return None;
        }
        let mut counts = [0usize; 6];
        for (i, c) in counts.iter_mut().enumerate() {
            let b = bytes.get(at + 20 + i * 4..at + 24 + i * 4)?;
            *c = u32::from_be_bytes(b.try_into().ok()?) as usize;
        }
        Some(counts)
    };
    let [isut, isstd, leap, time, types, chars] = header(0)?;
    let version = *bytes.get(4)?;
    let v1_len = time * 5 + types * 6 + chars + leap * 8 + isstd + isut;
    let (start, width, counts) = if version >= b'2' {
        let at = 44 + v1_len;
        (at + 44, 8, header(at)?)
    } else {
        (44, 4, [isut, isstd, leap, time, types, chars])
    };
    let [isut, isstd, leap, time, types, chars] = counts;
    let be = |at: usize, n: usize| -> Option<i64> {
        let b = bytes.get(at..at + n)?;
        Some(if n == 8 {
            i64::from_be_bytes(b.try_into().ok()?)
        } else {
            i64::from(i32::from_be_bytes(b.try_into().ok()?))
        })
    };
    let types_at = start + time * width + time;
    let offset_of = |t: usize| -> Option<i64> { be(types_at + t * 6, 4) };
    let mut transitions = Vec::with_capacity(time.min(bytes.len()));
    for i in 0..time {
        let at = be(start + i * width, width)?;
        let kind = usize::from(*bytes.get(start + time * width + i)?);
        transitions.push((at, offset_of(kind)?));
    }
    let initial = if types > 0 { offset_of(0)? } else { 0 };
    let end = types_at + types * 6 + chars + leap * (width + 4) + isstd + isut;
    let rule = if version >= b'2' {
        let footer = bytes.get(end..)?;
        let text = std::str::from_utf8(footer).ok()?.trim_matches('\n');
        parse_rule(text)
    } else {
        None
    };
    Some(Zone { transitions, initial, rule })
}

/// Parses a POSIX TZ string such as `UTC0`, `<+0530>-5:30` or `EST5EDT,M3.2.0,M11.1.0`.
fn parse_rule(text: &str) -> Option<Rule> {
    let mut p = Parser(text.as_bytes());
    p.name()?;
    let std = -p.offset()?;
    if p.0.is_empty() {
        return Some(Rule { std, dst: None });
    }
    p.name()?;
    let dst = if p.0.first().is_some_and(|c| *c != b',') { -p.offset()? } else { std + 3600 };
    let (start, end) = if p.eat(b',') {
        let start = p.change()?;
        if !p.eat(b',') {
            return None;
        }
        (start, p.change()?)
    } else {
        // The C library's default: the US rules.
        (Change { day: Day::Month(3, 2, 0), time: 7200 }, Change { day: Day::Month(11, 1, 0), time: 7200 })
    };
    Some(Rule { std, dst: Some((dst, start, end)) })
}

struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    fn eat(&mut self, c: u8) -> bool {
        match self.0.split_first() {
            Some((&first, rest)) if first == c => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn name(&mut self) -> Option<()> {
        let len = if self.eat(b'<') {
            let len = self.0.iter().position(|&c| c == b'>')?;
            self.0 = self.0.get(len + 1..)?;
            len
        } else {
            let len = self.0.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            self.0 = self.0.get(len..)?;
            len
        };
        (len >= 3).then_some(())
    }

    fn number(&mut self) -> Option<i64> {
        let len = self.0.iter().take_while(|c| c.is_ascii_digit()).count();
        let digits = std::str::from_utf8(self.0.get(..len)?).ok()?;
        self.0 = self.0.get(len..)?;
        digits.parse().ok()
    }

    /// `[+|-]hh[:mm[:ss]]` as seconds (west of UTC is positive, as POSIX writes it).
    fn offset(&mut self) -> Option<i64> {
        let sign = if self.eat(b'-') {
            -1
        } else {
            self.eat(b'+');
            1
        };
        let mut secs = self.number()? * 3600;
        if self.eat(b':') {
            secs += self.number()? * 60;
            if self.eat(b':') {
                secs += self.number()?;
            }
        }
        Some(sign * secs)
    }

    fn change(&mut self) -> Option<Change> {
        let day = if self.eat(b'M') {
            let m = self.number()?;
            self.eat(b'.').then_some(())?;
            let w = self.number()?;
            self.eat(b'.').then_some(())?;
            let d = self.number()?;
            ((1..=12).contains(&m) && (1..=5).contains(&w) && (0..=6).contains(&d)).then_some(Day::Month(m, w, d))?
        } else if self.eat(b'J') {
            Day::Julian(self.number()?.clamp(1, 365))
        } else {
            Day::Zero(self.number()?.clamp(0, 365))
        };
        let time = if self.eat(b'/') { self.offset()? } else { 7200 };
        Some(Change { day, time })
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000, 0, 59, 11_016, 20_000, 47_482] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn posix_rules_parse() {
        assert_eq!(parse_rule("UTC0"), Some(Rule { std: 0, dst: None }));
        assert_eq!(parse_rule("<+0530>-5:30"), Some(Rule { std: 19_800, dst: None }));
        let cet = parse_rule("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        // 2030-07-01 12:00 UTC is summer; 2030-01-01 is winter.
        assert_eq!(cet.offset_at(1_909_137_600), 7200);
        assert_eq!(cet.offset_at(1_893_456_000), 3600);
        assert_eq!(parse_rule("X"), None);
    }
}
