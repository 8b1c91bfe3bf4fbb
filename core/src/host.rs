//! This host, as names and messages show it.

/// The kernel's host name; `None` if it cannot be read or is empty. Callers pick their own
/// fallback (an agent id, a certificate name).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
}
