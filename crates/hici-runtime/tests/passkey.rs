//! Passkey prompts and NumPy legacy RNG versus values produced by real NumPy
//! (`testdata/passkey_numpy.json`, made by `testdata/make_passkey_table.py`).

use hici_runtime::passkey::{
    build_case, garbage_prefix, n_garbage, score, test_points, LegacyRandomState, PasskeyResult,
    FINAL_QUESTION, GARBAGE_UNIT, TASK_DESCRIPTION,
};
use hici_runtime::RuntimeError;
use serde_json::Value;

fn table() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/passkey_numpy.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("passkey_numpy.json")).expect("json")
}

fn u(v: &Value) -> usize {
    v.as_u64().expect("unsigned integer") as usize
}

/// The target used for a table row's `n_garbage` (any target in its 1024-character bucket).
fn target_for(n_garbage_chars: usize) -> usize {
    // n_garbage(t) = floor(15 t / 4096) * 1024, so t = ceil(4096 k / 15) hits k = n / 1024.
    let k = n_garbage_chars / 1024;
    (4096 * k).div_ceil(15)
}

#[test]
fn raw_generator_matches_numpy() {
    let t = table();
    let mut r = LegacyRandomState::new(5489);
    for v in t["mt19937_seed5489_uint32"].as_array().unwrap() {
        assert_eq!(u64::from(r.next_u32()), v.as_u64().unwrap());
    }
}

#[test]
fn randint_matches_numpy_on_every_branch() {
    let t = table();
    let mut n = 0;
    for s in t["randint"].as_array().unwrap() {
        let seed = u32::try_from(s["seed"].as_u64().unwrap()).unwrap();
        let mut r = LegacyRandomState::new(seed);
        for d in s["draws"].as_array().unwrap() {
            let (lo, hi) = (d["low"].as_i64().unwrap(), d["high"].as_i64().unwrap());
            let got = r.randint(lo, hi).expect("valid bounds");
            assert_eq!(
                got,
                d["value"].as_i64().unwrap(),
                "seed {seed} randint({lo}, {hi})"
            );
            n += 1;
        }
    }
    println!("{n} randint draws match numpy {}", t["numpy_version"]);
    assert!(LegacyRandomState::new(0).randint(3, 3).is_err());
    assert!(LegacyRandomState::new(0).randint(4, 3).is_err());
}

#[test]
fn n_garbage_matches_python() {
    for row in table()["n_garbage"].as_array().unwrap() {
        assert_eq!(
            n_garbage(u(&row["target_tokens"])),
            u(&row["n_garbage"]),
            "{row}"
        );
    }
    assert_eq!(n_garbage(273), 0);
    assert_eq!(n_garbage(0), 0);
}

#[test]
fn cases_match_numpy_table() {
    let t = table();
    let rows = t["passkey"].as_array().unwrap();
    for row in rows {
        let ng = u(&row["n_garbage"]);
        let target = target_for(ng);
        assert_eq!(n_garbage(target), ng);
        let c = build_case(target, u(&row["seed"])).expect("case");
        assert_eq!(c.n_garbage, ng);
        assert_eq!(c.prefix_chars, u(&row["prefix_chars"]), "{row}");
        assert_eq!(
            u64::from(c.pass_key),
            row["pass_key"].as_u64().unwrap(),
            "{row}"
        );
        assert_eq!(c.prompt.len(), u(&row["prompt_chars"]), "{row}");
        assert_eq!(c.answer, c.pass_key.to_string());
        assert_eq!(c.target_tokens, target);
        assert_eq!(c.trial, u(&row["seed"]));
    }
    println!("{} (seed, n_garbage) rows match numpy", rows.len());
}

#[test]
fn whole_prompts_match_python() {
    for p in table()["prompts"].as_array().unwrap() {
        let c = build_case(u(&p["target_tokens"]), u(&p["seed"])).expect("case");
        assert_eq!(c.prompt, p["prompt"].as_str().unwrap());
        assert_eq!(c.answer, p["answer"].as_str().unwrap());
    }
}

#[test]
fn prompt_structure() {
    for (target, trial) in [(1024, 0), (4096, 3), (16384, 9), (300, 1)] {
        let c = build_case(target, trial).expect("case");
        let lines: Vec<&str> = c.prompt.split('\n').collect();
        assert_eq!(lines.len(), 5, "five lines");
        assert_eq!(lines[0], TASK_DESCRIPTION);
        assert_eq!(lines[1].len(), c.prefix_chars);
        let k = c.pass_key;
        assert_eq!(
            lines[2],
            format!("The pass key is {k}. Remember it. {k} is the pass key.")
        );
        assert_eq!(lines[3].len(), c.n_garbage - c.prefix_chars);
        assert_eq!(lines[1].len() + lines[3].len(), c.n_garbage);
        assert_eq!(lines[4], FINAL_QUESTION);
        assert!(c.prefix_chars < c.n_garbage);
        assert!((1..50000).contains(&c.pass_key));
        // Both filler parts are leading pieces of the same repeated text.
        let filler = garbage_prefix(c.n_garbage);
        assert!(filler.starts_with(lines[1]));
        assert!(filler.starts_with(lines[3]));
        assert_eq!(
            c.prompt.len(),
            TASK_DESCRIPTION.len() + c.n_garbage + lines[2].len() + FINAL_QUESTION.len() + 4
        );
    }
    let g = garbage_prefix(2 * GARBAGE_UNIT.len() + 1);
    assert_eq!(g, format!("{GARBAGE_UNIT} {GARBAGE_UNIT}"));
    // Beyond the reference's fixed 5000-unit filler, the text keeps repeating.
    let c = build_case(131_072, 0).expect("large target");
    assert_eq!(c.n_garbage, 491_520);
    assert_eq!(
        c.prompt.split('\n').nth(3).unwrap().len(),
        c.n_garbage - c.prefix_chars
    );
}

#[test]
fn bad_cases_are_errors() {
    assert!(matches!(build_case(273, 0), Err(RuntimeError::Input(_))));
    assert!(matches!(build_case(0, 0), Err(RuntimeError::Input(_))));
    assert!(build_case(274, 0).is_ok());
    assert!(matches!(
        build_case(1024, 1 << 33),
        Err(RuntimeError::Input(_))
    ));
}

#[test]
fn points_score_and_summary() {
    assert_eq!(test_points(10_000, 2048), vec![2048, 4096, 6144, 8192]);
    assert_eq!(test_points(8192, 2048), vec![2048, 4096, 6144, 8192]);
    assert_eq!(test_points(1000, 2048), Vec::<usize>::new());
    assert_eq!(test_points(1000, 0), Vec::<usize>::new());

    assert!(score(&[29871, 29946, 29906], &[29871, 29946, 29906]));
    assert!(!score(&[29871, 29946, 29906], &[29871, 29946, 29900]));
    assert!(!score(&[29871, 29946, 29906], &[29871, 29946]));
    assert!(!score(&[], &[]));

    let r = PasskeyResult::from_trials(4096, &[4001, 4002, 4004], 2);
    assert_eq!(r.mean_prompt_tokens, 4002); // 12007 // 3
    assert_eq!((r.trials, r.correct), (3, 2));
    assert!((r.accuracy - 2.0 / 3.0).abs() < 1e-12);
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["mean_prompt_tokens"], 4002);
    let empty = PasskeyResult::from_trials(4096, &[], 0);
    assert_eq!((empty.mean_prompt_tokens, empty.accuracy), (0, 0.0));
}
