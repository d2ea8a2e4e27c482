//! HTTP-dates (RFC 9110 section 5.6.7), for the expiry header.

use std::{
    cell::RefCell,
    time::{SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;

/// `at` as the header value of an IMF-fixdate. The text changes once a
/// second, so each thread formats it once a second and hands out clones,
/// which share its bytes.
pub(crate) fn header_value(at: SystemTime) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let secs = seconds(at);
    LAST.with_borrow_mut(|last| match last {
        Some((second, value)) if *second == secs => value.clone(),
        _ => {
            let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(format(at)))
                .expect("an IMF-fixdate is a valid header value");
            *last = Some((secs, value.clone()));
            value
        }
    })
}

fn seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `at` as an IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn format(at: SystemTime) -> String {
    let secs = seconds(at);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> String {
        format(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn a_header_value_is_the_imf_fixdate_of_its_own_second() {
        let second = UNIX_EPOCH + Duration::from_secs(784_111_777);
        for at in [
            second,
            second + Duration::from_millis(999),
            second + Duration::from_secs(1),
            second,
        ] {
            assert_eq!(header_value(at), format(at).as_str());
        }
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
    }
}
