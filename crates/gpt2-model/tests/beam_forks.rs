//! Rows forked from one another (beams) share most of their cached history, and a decode step
//! reads what they share once for all of them; each row's logits keep the bits of the same
//! history decoded alone, in every weight and KV storage format.

mod support;

use support::{demo_in_every_storage, prefilled};

#[test]
fn forked_rows_attend_as_each_alone() {
    let prompt = [5u32, 17, 300, 2, 9, 1000, 44, 8];
    // Each step's token per row, and the forks after it (row `i` becomes a copy of `forks[i]`).
    let plan: [(&[u32], &[u32]); 5] = [
        (&[11, 11, 11, 11], &[0, 0, 1, 1]),
        (&[12, 13, 14, 15], &[0, 1, 1, 3]),
        (&[16, 17, 18, 19], &[2, 2, 2, 0]),
        (&[20, 21, 22, 23], &[0, 1, 2, 3]),
        (&[24, 25, 26, 27], &[3, 3, 1, 1]),
    ];
    for (storage, model) in demo_in_every_storage() {
        let mut beams = prefilled(&model, &prompt, 1);
        beams.reorder(&[0, 0, 0, 0]).unwrap();
        // Each row's tokens so far, to replay alone.
        let mut histories: Vec<Vec<u32>> = vec![Vec::new(); 4];
        for (step, (tokens, forks)) in plan.iter().enumerate() {
            let together = model.forward_step(tokens, &mut [&mut beams]).unwrap();
            let vocab = together.len() / tokens.len();
            for (row, &token) in tokens.iter().enumerate() {
                histories[row].push(token);
                let mut alone = prefilled(&model, &prompt, 1);
                let mut logits = Vec::new();
                for &token in &histories[row] {
                    logits = model.forward_step(&[token], &mut [&mut alone]).unwrap();
                }
                let differs = together[row * vocab..(row + 1) * vocab]
                    .iter()
                    .zip(&logits)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    differs, None,
                    "{storage}, step {step}, row {row}: first logit that differs from the row \
                     decoded alone"
                );
            }
            beams.reorder(forks).unwrap();
            histories = forks
                .iter()
                .map(|&f| histories[f as usize].clone())
                .collect();
        }
    }
}
