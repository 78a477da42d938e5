//! Kernel throughput on SmolLM2's shapes: weights hot in cache (compute bound) and streamed
//! from memory through many distinct matrices (as decode does), in GB/s of weights read and
//! ms per token-equivalent, and in GOP/s (a multiply-add counted as two operations) at 1, 4,
//! 16 and 64 activation rows, which is what batching buys.
//! `cargo bench -p potluck-engine --bench quant_matmul`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use potluck_engine::quant_matmul::QuantMatrix;
use potluck_engine::rng::Rng;
use std::time::Instant;

fn matrix(rng: &mut Rng, rows: usize, cols: usize, dtype: GgmlDType) -> (QuantMatrix, usize) {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, dtype).expect("quantize");
    let bytes = q.storage_size_in_bytes();
    (QuantMatrix::from_qtensors(&[&q]).expect("matrix"), bytes)
}

fn run(name: &str, mats: &[(QuantMatrix, usize)], m: usize, reps: usize) {
    let cols = mats[0].0.cols();
    let x: Vec<f32> = (0..m * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let bytes: usize = mats.iter().map(|(_, b)| b).sum();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            for (q, _) in mats {
                std::hint::black_box(q.matmul(&x, m).expect("matmul"));
            }
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    let ops: usize = mats.iter().map(|(q, _)| 2 * q.rows() * q.cols() * m).sum();
    println!(
        "{name:<44} m={m:<4} {:>8.3} ms/pass {:>7.1} GB/s of weights {:>7.1} GOP/s",
        best * 1e3,
        bytes as f64 / best / 1e9,
        ops as f64 / best / 1e9
    );
}

fn main() {
    let mut rng = Rng::new(1);
    let hot = vec![matrix(&mut rng, 1536, 576, GgmlDType::Q4_1)];
    for m in [1, 4, 16, 64] {
        run("Q4_1 gate/up 1536x576, cache-hot", &hot, m, 200 / m);
    }
    let hot8 = vec![matrix(&mut rng, 1536, 576, GgmlDType::Q8_0)];
    for m in [1, 4, 16, 64] {
        run("Q8_0 1536x576, cache-hot", &hot8, m, 200 / m);
    }
    // 30 blocks' worth of the largest projections: 66 MB, streamed like a decode step.
    let stream: Vec<_> = (0..60)
        .map(|_| matrix(&mut rng, 1536, 576, GgmlDType::Q4_1))
        .collect();
    for m in [1, 4, 16, 64] {
        run("Q4_1 60 x 1536x576, streamed", &stream, m, 3);
    }
    let head = vec![matrix(&mut rng, 49152, 576, GgmlDType::Q8_0)];
    run("Q8_0 LM head 49152x576, streamed", &head, 1, 5);
    // One decode token's projections: 30 blocks of qkv, o, gate_up, down (down reads 1536).
    let mut wide = Vec::new();
    let mut narrow = Vec::new();
    for _ in 0..30 {
        narrow.push(matrix(&mut rng, 960, 576, GgmlDType::Q4_1));
        narrow.push(matrix(&mut rng, 576, 576, GgmlDType::Q4_1));
        narrow.push(matrix(&mut rng, 3072, 576, GgmlDType::Q4_1));
        wide.push(matrix(&mut rng, 576, 1536, GgmlDType::Q4_1));
    }
    run("Q4_1 30 blocks' qkv+o+gate_up (576 wide)", &narrow, 1, 3);
    run("Q4_1 30 blocks' down (1536 wide)", &wide, 1, 3);
}
