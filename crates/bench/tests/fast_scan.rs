//! The fast scanner (`popek_decode::fast`) changes how the translator
//! finds instructions, not what they become: every block reachable from
//! each bundled Multiboot guest's entry (its first 400 blocks: a listing
//! is looked up by EIP among all the translations) translates to the same
//! host code,
//! instruction for instruction, with it and without it (the decoder's
//! path, checked against the interpreter by the difftest and lockstep).

use popek_bench::bundled_block_starts;
use popek_translate::Bt;

#[test]
fn every_bundled_block_translates_alike_with_and_without_the_fast_scanner() {
    let mut fast_in_all = 0;
    for (name, mut m, starts) in bundled_block_starts(400) {
        let mut with = Bt::new(None);
        let mut without = Bt::new(None);
        without.fast_scan = false;
        for &eip in &starts {
            with.translate_at(&mut m.cpu, eip);
            without.translate_at(&mut m.cpu, eip);
            assert_eq!(
                with.listing(eip),
                without.listing(eip),
                "{}: the block at {eip:#x}",
                name
            );
        }
        assert_eq!(
            with.stats.insns_translated, without.stats.insns_translated,
            "{}",
            name
        );
        assert_eq!(without.stats.insns_fast, 0, "{}", name);
        fast_in_all += with.stats.insns_fast;
    }
    // (The comparison means something only if the scanner took some.)
    assert!(
        fast_in_all > 1000,
        "{fast_in_all} fast-scanned instructions"
    );
}
