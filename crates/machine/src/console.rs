//! The host side of the guest's serial console: popek's stdin feeds COM1's
//! receiver, as with QEMU's `-serial stdio`.
//!
//! A thread reads stdin and sends each byte to the run loop over a
//! channel (the run loop never blocks on the host, except when the guest is
//! halted waiting for an interrupt). When stdin is a terminal it is put in
//! raw mode for the run (restored when the [`RawTerminal`] guard drops,
//! whatever ends the run), so keys reach the guest one by one; Ctrl-A X
//! ends popek, and Ctrl-A Ctrl-A sends one Ctrl-A, as in QEMU.

use std::io::Read;
use std::sync::mpsc::{channel, Receiver};

/// What the console thread sends to the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialInput {
    /// A byte for the guest's serial line.
    Byte(u8),
    /// The user typed Ctrl-A X: end the run.
    Quit,
}

/// Ctrl-A, the escape key.
const CTRL_A: u8 = 0x01;

/// Turn raw stdin bytes into serial input, handling the Ctrl-A escapes.
#[derive(Debug, Default)]
pub struct Escapes {
    pending: bool,
}

impl Escapes {
    /// The input `b` stands for, if any.
    pub fn feed(&mut self, b: u8) -> Option<SerialInput> {
        if std::mem::take(&mut self.pending) {
            return match b {
                b'x' | b'X' => Some(SerialInput::Quit),
                CTRL_A => Some(SerialInput::Byte(CTRL_A)),
                _ => None,
            };
        }
        if b == CTRL_A {
            self.pending = true;
            return None;
        }
        Some(SerialInput::Byte(b))
    }
}

/// Start reading popek's stdin for the guest's serial line. The receiver
/// disconnects at end of input.
pub fn stdin_reader() -> Receiver<SerialInput> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut esc = Escapes::default();
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if let Some(i) = esc.feed(b) {
                    if tx.send(i).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Stdin in raw mode while this lives (when stdin is a terminal).
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Put stdin in raw mode if it is a terminal (otherwise do nothing).
    pub fn new() -> RawTerminal {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return RawTerminal { saved: None };
        }
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios; fd 0 is a terminal (checked).
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawTerminal { saved: None };
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        // Keep output processing so the host terminal still turns the
        // guest's "\n" into a new line.
        t.c_oflag |= libc::OPOST;
        // SAFETY: `t` is a valid termios for fd 0.
        let ok = unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } == 0;
        RawTerminal {
            saved: ok.then_some(saved),
        }
    }
}

impl Default for RawTerminal {
    fn default() -> Self {
        RawTerminal::new()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restoring the attributes read from fd 0 in `new`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_escapes_as_in_qemu() {
        let mut e = Escapes::default();
        let got: Vec<_> = b"a\x01\x01b\x01zc\x01x"
            .iter()
            .filter_map(|&b| e.feed(b))
            .collect();
        assert_eq!(
            got,
            [
                SerialInput::Byte(b'a'),
                SerialInput::Byte(CTRL_A),
                SerialInput::Byte(b'b'),
                SerialInput::Byte(b'c'),
                SerialInput::Quit
            ]
        );
    }
}
