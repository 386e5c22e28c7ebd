//! Values of flags, config keys and annotations: durations, CIDR lists,
//! interface lists, booleans. Pure: strings in, values or a message out.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use std::time::Duration;

use ipnet::IpNet;

/// Parses "500ms", "1s", "2m", "1h" (as kube-proxy's flags take them).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses "10.0.0.0/8,192.168.1.0/24" (bare addresses are /32 or /128).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("{c:?} is not a CIDR"))
        })
        .collect()
}

/// Parses `--interfaces`: comma-separated interface names; "none" (or an
/// empty list) attaches the TC path nowhere.
pub fn parse_interfaces(s: &str) -> Result<Vec<String>, String> {
    if s.trim() == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if n.len() > 15 || n.contains(['/', ' ', ':']) || n == "." || n == ".." {
                Err(format!("{n:?} is not an interface name"))
            } else {
                Ok(n.to_string())
            }
        })
        .collect()
}

/// Parses a boolean flag value: true/false (also yes/no, 1/0).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn cidr_lists() {
        let v = parse_cidrs("198.18.0.0/15, 10.0.0.1").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to_string(), "10.0.0.1/32");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
    }
}
