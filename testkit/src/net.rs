//! Ports for test servers.

use std::net::TcpListener;
use std::sync::Mutex;

/// A TCP port on 127.0.0.1 that is free now and that no other call in this
/// process returns.
///
/// Below the kernel's ephemeral range (32768+), so no outgoing connection
/// can take the port between this check and the server's bind; the start
/// is spread by pid, so test binaries running side by side rarely probe
/// the same ports.
pub fn free_port() -> u16 {
    static NEXT: Mutex<u32> = Mutex::new(0);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    if *next == 0 {
        *next = 20_000 + (std::process::id() * 7919) % 12_000;
    }
    for _ in 0..12_000 {
        let p = *next as u16;
        *next = if *next >= 31_999 { 20_000 } else { *next + 1 };
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in 20000..32000")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct_and_bindable() {
        let (a, b) = (super::free_port(), super::free_port());
        assert_ne!(a, b);
        std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
        std::net::TcpListener::bind(("127.0.0.1", b)).unwrap();
    }
}
