//! The guest kernel command line both backends build from the user's: one
//! copy of the rules (the built-in VMM's `cmdline.rs` and the QEMU backend
//! call [`compose`]).
//!
//! - `console=ttyS0` comes **first**, unless the user already names ttyS0 as
//!   a console. Crash and power-off detection read the serial console, and
//!   the kernel prints to every console given, so the user's `console=hvc0`
//!   (or any other) still works: the *last* `console=` becomes
//!   `/dev/console`, which stays the user's.
//! - The user's kernel words follow, unchanged.
//! - Then the backend's defaults whose key (text before `=`) the user did not
//!   set (`reboot=`, `panic=`, ...), then the words the backend always adds
//!   (device locations, PVM feature masks).
//! - A user `--` (init's arguments follow it) stays last.

/// The console the VMM reads for crash and power-off lines.
pub const SERIAL_CONSOLE: &str = "console=ttyS0";

/// The text before `=` of one argument.
fn key(arg: &str) -> &str {
    arg.split('=').next().unwrap_or(arg)
}

/// `user` split into the kernel's part and, after a `--`, init's part.
pub fn split_init(user: &str) -> (&str, Option<&str>) {
    let user = user.trim();
    match user.find(" -- ") {
        Some(i) => (&user[..i], Some(&user[i + 4..])),
        None if user == "--" => ("", Some("")),
        None => match user.strip_suffix(" --") {
            Some(k) => (k, Some("")),
            None => (user, None),
        },
    }
}

/// Does the kernel part name ttyS0 as a console (`console=ttyS0`,
/// `console=ttyS0,115200n8`)?
fn has_serial_console(kernel_words: &str) -> bool {
    kernel_words.split_whitespace().any(|w| {
        w.strip_prefix("console=")
            .is_some_and(|v| v.split(',').next() == Some("ttyS0"))
    })
}

/// The guest command line: see the module docs.
pub fn compose(user: &str, defaults: &[&str], always: &[&str]) -> String {
    let (kernel_part, init_part) = split_init(user);
    let present: Vec<&str> = kernel_part.split_whitespace().map(key).collect();
    let mut words: Vec<&str> = Vec::new();
    if !has_serial_console(kernel_part) {
        words.push(SERIAL_CONSOLE);
    }
    if !kernel_part.is_empty() {
        words.push(kernel_part);
    }
    for arg in defaults.iter().flat_map(|d| d.split_whitespace()) {
        if !present.contains(&key(arg)) {
            words.push(arg);
        }
    }
    words.extend(always.iter().flat_map(|a| a.split_whitespace()));
    let mut line = words.join(" ");
    if let Some(init) = init_part {
        line.push_str(" --");
        if !init.is_empty() {
            line.push(' ');
            line.push_str(init);
        }
    }
    line
}

/// Why the user's command line would hide the console lines the backends
/// watch, if it does. `loglevel=N` with N <= 0 makes the kernel print
/// nothing to the console, not even `KERN_EMERG` (the panic and power-down
/// lines): `console_verbose()` in `panic()` only raises a non-zero level.
/// `quiet` (level 4) hides neither. The last `loglevel=` counts, as in the
/// kernel.
pub fn hides_console_events(user: &str) -> Option<String> {
    let (kernel_part, _) = split_init(user);
    let level = kernel_part
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("loglevel="))
        .filter_map(parse_kernel_int)
        .next_back()?;
    (level <= 0).then(|| {
        format!(
            "loglevel={level} hides the kernel's panic and power-down lines from the serial \
             console, which the VMM watches to tell a crash from a clean exit; use loglevel=1 \
             or higher (quiet is fine)"
        )
    })
}

/// An integer as the kernel's `get_option` reads it: optional sign, then
/// decimal, `0x` hex or leading-`0` octal; trailing text ends the number.
fn parse_kernel_int(s: &str) -> Option<i64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        // "0" alone or "0x" / "0" prefixes without digits.
        return (s == "0").then_some(0);
    }
    let v = i64::from_str_radix(&digits[..end], radix).ok()?;
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_console_first_and_user_console_last() {
        assert_eq!(
            compose("console=hvc0 quiet", &["console=ttyS0", "panic=-1"], &[]),
            "console=ttyS0 console=hvc0 quiet panic=-1",
            "the user's console stays /dev/console; ours never replaces it"
        );
        assert_eq!(
            compose("console=ttyS0,115200n8 quiet", &["panic=-1"], &[]),
            "console=ttyS0,115200n8 quiet panic=-1",
            "the user's own ttyS0 options are kept (no second ttyS0)"
        );
        assert_eq!(
            compose("", &["a=1 b"], &["x"]),
            "console=ttyS0 a=1 b x",
            "empty user line"
        );
    }

    #[test]
    fn defaults_skip_keys_the_user_set_and_always_words_do_not() {
        assert_eq!(
            compose(
                "panic=5 mitigations=auto",
                &["reboot=k", "panic=-1"],
                &["mitigations=off"]
            ),
            "console=ttyS0 panic=5 mitigations=auto reboot=k mitigations=off"
        );
    }

    #[test]
    fn init_arguments_stay_last() {
        assert_eq!(
            compose("quiet -- --debug panic=3", &["panic=-1"], &["dev=1"]),
            "console=ttyS0 quiet panic=-1 dev=1 -- --debug panic=3",
            "panic=3 after -- belongs to init, so our panic=-1 is still added"
        );
        assert_eq!(compose("quiet --", &["x"], &[]), "console=ttyS0 quiet x --");
        assert_eq!(compose("--", &[], &["y"]), "console=ttyS0 y --");
        assert_eq!(
            compose("a -- console=hvc0", &[], &[]),
            "console=ttyS0 a -- console=hvc0"
        );
    }

    #[test]
    fn loglevel_zero_is_refused_quiet_is_not() {
        assert!(hides_console_events("quiet").is_none());
        assert!(hides_console_events("loglevel=1").is_none());
        assert!(hides_console_events("loglevel=0 loglevel=4").is_none());
        assert!(hides_console_events("loglevel=junk").is_none());
        assert!(hides_console_events("a -- loglevel=0").is_none(), "init's");
        for bad in [
            "loglevel=0",
            "quiet loglevel=0",
            "loglevel=4 loglevel=0x0",
            "loglevel=-1",
        ] {
            let why = hides_console_events(bad).unwrap_or_else(|| panic!("{bad}"));
            assert!(why.contains("loglevel="), "{why}");
        }
        assert_eq!(parse_kernel_int("010"), Some(8));
        assert_eq!(parse_kernel_int("7abc"), Some(7));
        assert_eq!(parse_kernel_int("x"), None);
    }
}
