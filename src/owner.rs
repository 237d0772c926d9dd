//! Which eva process holds a directory: this process's identity (pid, host name, boot id, start
//! time) and whether a recorded one still runs. One identification for the two markers eva
//! writes: `--out`'s temporary directories ([`crate::adapter::write`]) and the checkpoint
//! directory's owner ([`crate::engine::checkpoint::owner`]).

/// A process, identified well enough to tell, on its own host, whether it still runs: a pid is
/// reused, but not with the same start time in the same boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub host: String,
    pub boot: String,
    /// Start time of the process in clock ticks after boot (`/proc/PID/stat`, field 22).
    pub start: u64,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Field 22 of `/proc/PID/stat` (after the parenthesized command name, which may hold spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

impl Owner {
    /// This process (`None` without `/proc`).
    pub fn me() -> Option<Owner> {
        let pid = std::process::id();
        Some(Owner {
            pid,
            host: read_trimmed("/proc/sys/kernel/hostname")?,
            boot: read_trimmed("/proc/sys/kernel/random/boot_id")?,
            start: start_time(pid)?,
        })
    }

    /// `title`, then one line per field.
    pub fn encode(&self, title: &str) -> String {
        format!(
            "{title}\npid {}\nhost {}\nboot {}\nstart {}\n",
            self.pid, self.host, self.boot, self.start
        )
    }

    /// Reads back [`Owner::encode`] with this `title`; returns the lines after it too.
    pub fn decode<'t>(text: &'t str, title: &str) -> Option<(Owner, std::str::Lines<'t>)> {
        let mut lines = text.lines();
        if lines.next()? != title {
            return None;
        }
        let mut field = |key: &str| {
            lines
                .next()?
                .strip_prefix(key)?
                .strip_prefix(' ')
                .map(str::to_string)
        };
        let owner = Owner {
            pid: field("pid")?.parse().ok()?,
            host: field("host")?,
            boot: field("boot")?,
            start: field("start")?.parse().ok()?,
        };
        Some((owner, lines))
    }

    /// Whether this owner is certainly gone: same host, and another boot, or no process with its
    /// pid and start time. `me` is the current process's identity.
    pub fn is_dead(&self, me: &Owner) -> bool {
        self.host == me.host && (self.boot != me.boot || start_time(self.pid) != Some(self.start))
    }

    /// Whether this owner certainly still runs: same host and boot, and a process with its pid
    /// and start time. An owner of another host is neither dead nor running as far as this host
    /// can tell.
    pub fn runs(&self, me: &Owner) -> bool {
        self.host == me.host && !self.is_dead(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_gone_one_is_dead() {
        let me = Owner::me().expect("/proc is readable on Linux");
        assert!(me.runs(&me) && !me.is_dead(&me));
        let text = me.encode("t") + "more\n";
        let (back, mut rest) = Owner::decode(&text, "t").unwrap();
        assert_eq!(back, me);
        assert_eq!(rest.next(), Some("more"));
        assert!(Owner::decode(&me.encode("t"), "other").is_none());
        // Another start time (a reused pid), another boot: gone.
        for gone in [
            Owner {
                start: me.start + 1,
                ..me.clone()
            },
            Owner {
                boot: "another boot".into(),
                ..me.clone()
            },
        ] {
            assert!(gone.is_dead(&me) && !gone.runs(&me), "{gone:?}");
        }
        // Another host: this host cannot tell.
        let far = Owner {
            host: "elsewhere".into(),
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!far.is_dead(&me) && !far.runs(&me));
    }
}
