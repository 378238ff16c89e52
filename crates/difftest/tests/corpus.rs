//! The differential harness in the test suite: the regression corpus and a
//! fixed-seed batch of random sequences, each run natively on the host CPU
//! and under popek's interpreter. Zero divergences allowed.

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
        if let Some(why) = check(&case, &dir, Engine::Interp).unwrap() {
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
                        if let Some(why) = check(&case, dir, Engine::Interp).unwrap() {
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
