//! popek's paravirtual interface: hypercalls, and the balloon that uses
//! them. The full description for guest authors is docs/hypercalls.md;
//! in short:
//!
//! - **Discovery**: CPUID leaf 0x4000_0000 returns EAX = 0x4000_0001 (the
//!   highest hypervisor leaf) and the signature `"PopekPopekVM"` in EBX,
//!   ECX, EDX; leaf 0x4000_0001 returns EAX = the interface version. The
//!   range 0x4000_0000-0x4FFF_FFFF is reserved by Intel for hypervisors
//!   (SDM Vol. 2A, CPUID: "no existing or future CPU will return processor
//!   identification or feature information" there).
//! - **The call**: VMCALL (`0F 01 C1`) at CPL 0; EAX = call number, EBX,
//!   ECX, EDX = arguments; the result in EAX (a negative errno value on
//!   failure), other outputs where a call says so; every other register
//!   and EFLAGS are kept. At CPL > 0 VMCALL raises #UD, as on a processor
//!   without VMX: user code cannot reach the VMM.
//! - **The balloon**: the guest gives pages back by number (inflate), the
//!   host releases their memory (a hole punched in the RAM file), and
//!   takes them back on deflate (they read as zeros). The host sets a
//!   target (monitor, `--balloon`, `popek host`'s `balloon=`) and raises
//!   the IRQ line the guest chose with [`call::BALLOON_NOTIFY`] until the
//!   guest reads the new target.
//!
//! Everything here is plain state (snapshotted with the board); the vcpu
//! hands [`Paravirt::hypercall`] its registers, RAM, the UART (whose output
//! queue the console call writes into) and the machine time.

use popek_memory::GuestRam;

/// CPUID leaf 0x4000_0000's signature (EBX, ECX, EDX).
pub const SIGNATURE: &[u8; 12] = b"PopekPopekVM";
/// The interface version (CPUID leaf 0x4000_0001 EAX, [`call::INFO`] EAX).
pub const VERSION: u32 = 1;
/// The most page numbers one inflate or deflate call takes.
pub const MAX_PFNS: u32 = 1024;
/// The most bytes one console write takes.
pub const MAX_CONSOLE: u32 = 4096;

/// Call numbers (EAX).
pub mod call {
    /// EAX = interface version, EBX = guest RAM in 4 KiB pages, ECX = the
    /// highest call number.
    pub const INFO: u32 = 0;
    /// Does nothing: EAX = 0 (a round trip to the VMM and back).
    pub const NOP: u32 = 1;
    /// Write ECX bytes at guest-physical EBX to the console (the serial
    /// output, in order with what COM1 sent): EAX = ECX.
    pub const CONSOLE_WRITE: u32 = 2;
    /// EDX:EAX = the machine clock in ns (the one the PIT and RTC run on).
    pub const CLOCK: u32 = 3;
    /// EAX = pages the host wants in the balloon, EBX = pages it holds;
    /// reading it lowers the balloon's interrupt line.
    pub const BALLOON_TARGET: u32 = 4;
    /// Hand the host the ECX (at most [`super::MAX_PFNS`]) pages whose
    /// frame numbers (u32 each) lie at guest-physical EBX: EAX = how many
    /// entered the balloon (pages already in it are not counted twice).
    pub const BALLOON_INFLATE: u32 = 5;
    /// Take back the ECX pages listed at EBX (they read as zeros): EAX =
    /// how many left the balloon.
    pub const BALLOON_DEFLATE: u32 = 6;
    /// Raise IRQ line EBX (0-15; 0xFFFF_FFFF: none) while a new balloon
    /// target waits to be read: EAX = 0.
    pub const BALLOON_NOTIFY: u32 = 7;
    /// The highest call number.
    pub const LAST: u32 = BALLOON_NOTIFY;
}

/// Errors (EAX, negated).
pub mod errno {
    /// A guest-physical range outside RAM.
    pub const EFAULT: u32 = 14;
    /// A bad argument (a count too large, an IRQ line above 15).
    pub const EINVAL: u32 = 22;
    /// An unknown call number.
    pub const ENOSYS: u32 = 38;
}

/// The paravirtual device's state.
#[derive(Debug, Clone, Default)]
pub struct Paravirt {
    /// Pages the host wants in the balloon.
    pub target: u32,
    /// One bit per guest page: in the balloon.
    pub ballooned: Vec<u64>,
    /// Pages in the balloon.
    pub held: u32,
    /// The IRQ line the guest asked for.
    pub notify_irq: Option<u8>,
    /// A target change the guest has not read yet (raises the line).
    pub pending: bool,
    /// Hypercalls made, by call number (unknown numbers counted last).
    pub calls: [u64; call::LAST as usize + 2],
    /// Pages inflated and deflated over the machine's life.
    pub inflated: u64,
    /// See `inflated`.
    pub deflated: u64,
}

impl Paravirt {
    /// Ask the guest to hold `pages` pages in the balloon.
    pub fn set_target(&mut self, pages: u32) {
        if pages != self.target {
            self.target = pages;
            self.pending = true;
        }
    }

    /// Is the balloon's interrupt line high, and which is it?
    pub fn irq(&self) -> Option<(u8, bool)> {
        self.notify_irq.map(|l| (l, self.pending))
    }

    fn in_balloon(&self, pfn: u32) -> bool {
        self.ballooned
            .get(pfn as usize / 64)
            .is_some_and(|w| w >> (pfn % 64) & 1 != 0)
    }

    fn set_ballooned(&mut self, pfn: u32, on: bool) {
        let i = pfn as usize / 64;
        if self.ballooned.len() <= i {
            self.ballooned.resize(i + 1, 0);
        }
        if on {
            self.ballooned[i] |= 1 << (pfn % 64);
        } else {
            self.ballooned[i] &= !(1 << (pfn % 64));
        }
    }

    /// Carry out the hypercall in `regs` (EAX, ECX, EDX, EBX, ESP, EBP,
    /// ESI, EDI order, as the vcpu keeps them). `console` receives the
    /// console call's bytes; `now` is the machine time in ns.
    pub fn hypercall(
        &mut self,
        regs: &mut [u32; 8],
        ram: &mut GuestRam,
        console: &mut Vec<u8>,
        now: u64,
    ) {
        const EAX: usize = 0;
        const ECX: usize = 1;
        const EDX: usize = 2;
        const EBX: usize = 3;
        let nr = regs[EAX];
        self.calls[nr.min(call::LAST + 1) as usize] += 1;
        let neg = |e: u32| e.wrapping_neg();
        let pages = ram.size() / 4096;
        let within =
            |addr: u32, len: u32| u64::from(addr) + u64::from(len) <= u64::from(ram.size());
        regs[EAX] = match nr {
            call::INFO => {
                regs[EBX] = pages;
                regs[ECX] = call::LAST;
                VERSION
            }
            call::NOP => 0,
            call::CONSOLE_WRITE => {
                let (addr, len) = (regs[EBX], regs[ECX]);
                if len > MAX_CONSOLE {
                    neg(errno::EINVAL)
                } else if !within(addr, len) {
                    neg(errno::EFAULT)
                } else {
                    console.extend((0..len).map(|i| ram.read(addr + i, 1) as u8));
                    len
                }
            }
            call::CLOCK => {
                regs[EDX] = (now >> 32) as u32;
                now as u32
            }
            call::BALLOON_TARGET => {
                self.pending = false;
                regs[EBX] = self.held;
                self.target
            }
            call::BALLOON_INFLATE | call::BALLOON_DEFLATE => {
                let (addr, n) = (regs[EBX], regs[ECX]);
                let inflate = nr == call::BALLOON_INFLATE;
                if n > MAX_PFNS {
                    neg(errno::EINVAL)
                } else if !within(addr, 4 * n) {
                    neg(errno::EFAULT)
                } else {
                    let list: Vec<u32> = (0..n).map(|i| ram.read(addr + 4 * i, 4) as u32).collect();
                    if list.iter().any(|&p| p >= pages) {
                        neg(errno::EINVAL)
                    } else {
                        let mut done = 0;
                        for p in list {
                            if self.in_balloon(p) == inflate {
                                continue;
                            }
                            self.set_ballooned(p, inflate);
                            if inflate {
                                ram.release_page(p);
                                self.held += 1;
                                self.inflated += 1;
                            } else {
                                self.held -= 1;
                                self.deflated += 1;
                            }
                            done += 1;
                        }
                        done
                    }
                }
            }
            call::BALLOON_NOTIFY => match regs[EBX] {
                u32::MAX => {
                    self.notify_irq = None;
                    0
                }
                l @ 0..=15 => {
                    self.notify_irq = Some(l as u8);
                    0
                }
                _ => neg(errno::EINVAL),
            },
            _ => neg(errno::ENOSYS),
        };
    }

    /// Hypercalls made in all.
    pub fn total_calls(&self) -> u64 {
        self.calls.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(pv: &mut Paravirt, ram: &mut GuestRam, eax: u32, ebx: u32, ecx: u32) -> [u32; 8] {
        let mut regs = [eax, ecx, 0x1111, ebx, 0x2222, 0x3333, 0x4444, 0x5555];
        let mut out = Vec::new();
        pv.hypercall(&mut regs, ram, &mut out, 5_000_000_123);
        regs
    }

    #[test]
    fn info_clock_and_unknown_calls() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        let mut pv = Paravirt::default();
        let r = call(&mut pv, &mut ram, call::INFO, 0, 0);
        assert_eq!((r[0], r[3], r[1]), (VERSION, 256, call::LAST));
        assert_eq!(&r[4..], &[0x2222, 0x3333, 0x4444, 0x5555]);
        let r = call(&mut pv, &mut ram, call::CLOCK, 0, 0);
        assert_eq!(u64::from(r[2]) << 32 | u64::from(r[0]), 5_000_000_123);
        let r = call(&mut pv, &mut ram, 99, 0, 0);
        assert_eq!(r[0] as i32, -38);
        assert_eq!(pv.total_calls(), 3);
    }

    #[test]
    fn console_write_checks_its_range() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        ram.write(0x1000, 4, u64::from(u32::from_le_bytes(*b"hi!\n")));
        let mut pv = Paravirt::default();
        let mut regs = [call::CONSOLE_WRITE, 4, 0, 0x1000, 0, 0, 0, 0];
        let mut out = b"x".to_vec();
        pv.hypercall(&mut regs, &mut ram, &mut out, 0);
        assert_eq!((regs[0], out.as_slice()), (4, &b"xhi!\n"[..]));
        let mut regs = [call::CONSOLE_WRITE, 2, 0, (1 << 20) - 1, 0, 0, 0, 0];
        pv.hypercall(&mut regs, &mut ram, &mut out, 0);
        assert_eq!(regs[0] as i32, -14);
        let mut regs = [call::CONSOLE_WRITE, MAX_CONSOLE + 1, 0, 0, 0, 0, 0, 0];
        pv.hypercall(&mut regs, &mut ram, &mut out, 0);
        assert_eq!(regs[0] as i32, -22);
    }

    #[test]
    fn balloon_inflates_releases_and_deflates() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        for p in 0x40..0x48u32 {
            ram.write(p * 4096 + 8, 4, 0xDEAD_BEEF);
        }
        // The list at 0x2000: pages 0x40..0x44, and 0x40 again.
        for (i, p) in [0x40u32, 0x41, 0x42, 0x43, 0x40].iter().enumerate() {
            ram.write(0x2000 + 4 * i as u32, 4, u64::from(*p));
        }
        let mut pv = Paravirt::default();
        assert_eq!(
            call(&mut pv, &mut ram, call::BALLOON_NOTIFY, 16, 0)[0] as i32,
            -22
        );
        assert_eq!(call(&mut pv, &mut ram, call::BALLOON_NOTIFY, 9, 0)[0], 0);
        assert_eq!(pv.irq(), Some((9, false)));
        pv.set_target(4);
        assert_eq!(pv.irq(), Some((9, true)));
        let r = call(&mut pv, &mut ram, call::BALLOON_TARGET, 0, 0);
        assert_eq!((r[0], r[3], pv.irq()), (4, 0, Some((9, false))));
        assert_eq!(
            call(&mut pv, &mut ram, call::BALLOON_INFLATE, 0x2000, 5)[0],
            4
        );
        assert_eq!(pv.held, 4);
        assert_eq!(ram.read(0x40 * 4096 + 8, 4), 0, "released pages read zero");
        assert_eq!(ram.read(0x44 * 4096 + 8, 4), 0xDEAD_BEEF, "others kept");
        assert_eq!(ram.released_pages(), 4);
        // A page outside RAM refuses the whole list.
        ram.write(0x2000, 4, 256);
        assert_eq!(
            call(&mut pv, &mut ram, call::BALLOON_DEFLATE, 0x2000, 2)[0] as i32,
            -22
        );
        ram.write(0x2000, 4, 0x40);
        assert_eq!(
            call(&mut pv, &mut ram, call::BALLOON_DEFLATE, 0x2000, 2)[0],
            2
        );
        assert_eq!((pv.held, pv.inflated, pv.deflated), (2, 4, 2));
        let r = call(&mut pv, &mut ram, call::BALLOON_TARGET, 0, 0);
        assert_eq!(r[3], 2);
        assert_eq!(
            call(&mut pv, &mut ram, call::BALLOON_INFLATE, 0, MAX_PFNS + 1)[0] as i32,
            -22
        );
    }
}
