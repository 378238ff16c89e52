//! The differential harness in the test suite: the regression corpus and a
//! fixed-seed batch of random sequences, each run natively on the host CPU
//! and under both of popek's engines (interpreter and binary translator).
//! Zero divergences allowed.

use popek_difftest::{check, gen, parse_corpus_line, report, Engine};

/// Random cases per CI run (seeds 1..=N).
const FIXED_SEED_CASES: u64 = 20_000;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("popek-difftest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn regression_corpus() {
    let dir = temp_dir("corpus");
    let text = include_str!("../corpus.txt");
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let case = parse_corpus_line(line).unwrap_or_else(|| panic!("bad corpus line: {line}"));
        if let Some(why) = check(&case, &dir, Engine::Both).unwrap() {
            panic!("{}", report(&case, &why));
        }
        n += 1;
    }
    assert!(n >= 4);
}

#[test]
fn fixed_seed_random_sequences() {
    let dir = temp_dir("seeded");
    let threads = 2;
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let dir = &dir;
                s.spawn(move || {
                    let mut bad = Vec::new();
                    let mut seed = 1 + t;
                    while seed <= FIXED_SEED_CASES {
                        let case = gen::generate(seed, 20);
                        if let Some(why) = check(&case, dir, Engine::Both).unwrap() {
                            bad.push(format!("# seed {seed}\n{}", report(&case, &why)));
                            if bad.len() >= 3 {
                                break;
                            }
                        }
                        seed += threads;
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corpus_lines_round_trip() {
    let case = gen::generate(42, 30);
    let line = popek_difftest::corpus_line(&case);
    assert_eq!(parse_corpus_line(&line), Some(case));
}

#[test]
fn exceptions_mode_is_exercised() {
    // Cases whose seed is a multiple of 4 end in a faulting instruction;
    // natively each must reach the signal handler, and over a few dozen
    // seeds every signal the generator aims for must appear.
    use std::collections::BTreeSet;
    let dir = temp_dir("exc");
    let mut signals = BTreeSet::new();
    let mut traps = BTreeSet::new();
    for seed in (4..=400).step_by(4) {
        let case = gen::generate(seed, 5);
        let image = popek_difftest::elf::elf(&case);
        let native = popek_difftest::run_image_natively(&image, &dir).unwrap();
        assert_eq!(
            native.dump.len(),
            popek_difftest::elf::SIGNAL_DUMP_LEN as usize,
            "seed {seed}"
        );
        let word = |i: usize| u32::from_le_bytes(native.dump[4 * i..4 * i + 4].try_into().unwrap());
        signals.insert(word(0));
        traps.insert(word(13));
        for engine in [popek_machine::Engine::Interp, popek_machine::Engine::Bt] {
            let popek = popek_difftest::run_popek(&image, engine);
            assert_eq!(
                popek.dump.len(),
                native.dump.len(),
                "seed {seed} {engine:?}"
            );
        }
    }
    assert_eq!(
        signals,
        BTreeSet::from([4, 5, 8, 11]),
        "SIGILL, SIGTRAP, SIGFPE, SIGSEGV"
    );
    assert_eq!(
        traps,
        BTreeSet::from([0, 3, 4, 5, 6, 13, 14]),
        "#DE #BP #OF #BR #UD #GP #PF"
    );
}

#[test]
fn x87_is_generated_and_its_state_compared() {
    // The generator mixes x87 forms into the sequences and the dump carries
    // the FNSAVE image: over a few dozen seeds, many native runs must end
    // with values on the x87 stack, and popek must agree on every one.
    let dir = temp_dir("x87");
    let (mut with_x87, mut nonempty) = (0, 0);
    for seed in (1..=120).filter(|s| s % 4 != 0) {
        let case = gen::generate(seed, 20);
        if case.insns().any(|b| (0xD8..=0xDF).contains(&b[0])) {
            with_x87 += 1;
        }
        let image = popek_difftest::elf::elf(&case);
        let native = popek_difftest::run_image_natively(&image, &dir).unwrap();
        let state = popek_difftest::parse(&native.dump).expect("complete dump");
        if u16::from_le_bytes([state.fpu[8], state.fpu[9]]) != 0xFFFF {
            nonempty += 1;
        }
        for engine in [popek_machine::Engine::Interp, popek_machine::Engine::Bt] {
            let popek = popek_difftest::run_popek(&image, engine);
            let why = popek_difftest::compare(&case, &native, &popek);
            assert!(why.is_none(), "seed {seed} {engine:?}: {why:?}");
        }
    }
    assert!(
        with_x87 >= 45,
        "only {with_x87} of 90 cases have x87 instructions"
    );
    assert!(
        nonempty >= 30,
        "only {nonempty} of 90 cases end with a non-empty x87 stack"
    );
}
