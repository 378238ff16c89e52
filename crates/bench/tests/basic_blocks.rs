//! `--stats`' "guest basic blocks they cover" counts, for each
//! translation, the basic blocks a translator of basic blocks would have
//! made of the same instructions. The oracle is the decoder's basic-block
//! scanner (`popek_decode::scan_block`, which ends a block at every
//! control transfer): a superblock's instructions are walked block by
//! block from its start, going on at a conditional branch's fall-through
//! or a direct jump's target whenever the superblock holds more
//! instructions, and the blocks walked must be the count the translator
//! gave. With superblocks off each translation is one basic block.

use popek_bench::bundled_block_starts;
use popek_decode::{scan_block, BlockEnd};
use popek_translate::Bt;

/// The basic blocks a superblock of `n` instructions starting at `start`
/// covers, walked with the decoder's basic-block scanner.
fn walked(m: &mut popek_machine::Machine, start: u32, n: u64) -> u64 {
    let (mut at, mut left, mut count) = (start, n, 1);
    loop {
        let cpu = &mut m.cpu;
        let b = scan_block(|eip, buf| cpu.fetch(eip, buf).0, at, 32);
        let k = b.insns.len() as u64;
        if left <= k {
            return count;
        }
        left -= k;
        let Some(last) = b.insns.last().map(|i| &i.ins) else {
            panic!("the translation at {start:#x} holds {left} instructions past {at:#x}, where none decodes");
        };
        at = match b.end {
            BlockEnd::ControlFlow if last.is_jcc_short_or_near() => {
                count += 1;
                last.next_ip32()
            }
            BlockEnd::ControlFlow if last.is_jmp_short_or_near() => {
                count += 1;
                last.near_branch32()
            }
            // A special instruction the translator keeps in the block (a
            // helper call) ends no basic block of its.
            BlockEnd::Special(_) => last.next_ip32(),
            end => panic!(
                "the translation at {start:#x} holds {left} more instructions past {:#x} ({end:?})",
                last.ip32()
            ),
        };
    }
}

#[test]
fn each_translation_counts_the_basic_blocks_it_covers() {
    let mut superblocks_spanning_several = 0;
    for (name, mut m, starts) in bundled_block_starts(400) {
        for superblocks in [true, false] {
            let mut bt = Bt::new(None);
            bt.superblocks = superblocks;
            for &eip in &starts {
                let before = bt.stats;
                bt.translate_at(&mut m.cpu, eip);
                let s = bt.stats;
                if s.blocks_translated != before.blocks_translated + 1 {
                    continue;
                }
                let got = s.basic_blocks_translated - before.basic_blocks_translated;
                let n = s.insns_translated - before.insns_translated;
                let want = if superblocks && n > 0 {
                    walked(&mut m, eip, n)
                } else {
                    1
                };
                assert_eq!(
                    got, want,
                    "{}: the translation at {eip:#x} ({n} instructions, superblocks {superblocks})",
                    name
                );
                if want > 1 {
                    superblocks_spanning_several += 1;
                }
            }
        }
    }
    // (Meaningful only if some superblocks went past a branch.)
    assert!(
        superblocks_spanning_several > 100,
        "{superblocks_spanning_several} translations of several basic blocks"
    );
}
