//! The one waiting loop of the cluster tasks: ask until an answer is
//! there, for a bounded time.

use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// Calls `probe` every `every` until it gives `Ok(v)`, for at most `limit`.
/// `Err(state)` means "not yet" and describes what was seen: the error
/// after `limit` names `what` and the last state. An error of the outer
/// `Result` stops at once.
pub fn poll<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let state = match probe()? {
            Ok(v) => return Ok(v),
            Err(state) => state,
        };
        if Instant::now() > deadline {
            bail!("{what}: not after {} s ({state})", limit.as_secs());
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_answer_and_names_the_last_state_on_timeout() {
        let mut n = 0;
        let v = poll("counting", Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            Ok(if n == 3 {
                Ok(n)
            } else {
                Err(format!("at {n}"))
            })
        })
        .unwrap();
        assert_eq!(v, 3);
        let err = poll::<()>("never", Duration::ZERO, Duration::ZERO, || {
            Ok(Err("still no".into()))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "never: not after 0 s (still no)");
        let err = poll::<()>("broken", Duration::from_secs(5), Duration::ZERO, || {
            anyhow::bail!("cannot ask")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot ask");
    }
}
