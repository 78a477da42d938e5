//! Our Q4_1 / Q8_0 kernels against candle's dequantized weights, and the properties the
//! exactness of stage splits relies on.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use potluck_engine::quant_matmul::QuantMatrix;
use potluck_engine::rng::Rng;

fn random(rng: &mut Rng, rows: usize, cols: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn reference(w: &QTensor, x: &Tensor) -> Vec<f32> {
    let dense = w.dequantize(&Device::Cpu).unwrap();
    x.matmul(&dense.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn kernels_match_dequantized_weights() {
    let mut rng = Rng::new(3);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        // 37 rows: whole quads and a ragged tail; 5 activation rows: the prefill path.
        let w = QTensor::quantize(&random(&mut rng, 37, 256), dtype).unwrap();
        let x = random(&mut rng, 5, 256);
        let q = QuantMatrix::from_qtensors(&[&w]).unwrap();
        let got = q
            .matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), 5)
            .unwrap();
        let want = reference(&w, &x);
        let err: f32 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = want.iter().map(|b| b * b).sum::<f32>().sqrt();
        // 8-bit activations: about 1% relative error.
        assert!(
            err / norm < 0.02,
            "{dtype:?}: relative L2 error {}",
            err / norm
        );
    }
}

#[test]
fn rows_do_not_depend_on_stacking_or_batching() {
    let mut rng = Rng::new(4);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let a = QTensor::quantize(&random(&mut rng, 9, 128), dtype).unwrap();
        let b = QTensor::quantize(&random(&mut rng, 6, 128), dtype).unwrap();
        let x: Vec<f32> = random(&mut rng, 3, 128)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let stacked = QuantMatrix::from_qtensors(&[&a, &b])
            .unwrap()
            .matmul(&x, 3)
            .unwrap();
        let qa = QuantMatrix::from_qtensors(&[&a]).unwrap();
        let qb = QuantMatrix::from_qtensors(&[&b]).unwrap();
        for i in 0..3 {
            let row = &x[i * 128..(i + 1) * 128];
            let mut one = qa.matmul(row, 1).unwrap();
            one.extend(qb.matmul(row, 1).unwrap());
            assert_eq!(
                &stacked[i * 15..(i + 1) * 15],
                &one[..],
                "{dtype:?} row {i}"
            );
        }
    }
}

#[test]
fn malformed_inputs_are_refused() {
    let mut rng = Rng::new(5);
    let w = QTensor::quantize(&random(&mut rng, 4, 64), GgmlDType::Q4_1).unwrap();
    let q = QuantMatrix::from_qtensors(&[&w]).unwrap();
    assert!(q.matmul(&[0.0; 63], 1).is_err());
    let other = QTensor::quantize(&random(&mut rng, 4, 96), GgmlDType::Q4_1).unwrap();
    assert!(QuantMatrix::from_qtensors(&[&w, &other]).is_err());
    let f16 = QTensor::quantize(&random(&mut rng, 4, 64), GgmlDType::F16).unwrap();
    assert!(QuantMatrix::from_qtensors(&[&f16]).is_err());
    assert!(QuantMatrix::from_qtensors(&[]).is_err());
}

#[test]
fn activation_rounding_matches_the_reference_formula() {
    // Values exactly on .5 after scaling check nearest-even rounding on every path.
    let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
    x[0] = 127.0;
    let w = QTensor::quantize(
        &(Tensor::ones((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap() * 127.0).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    let q = QuantMatrix::from_qtensors(&[&w]).unwrap();
    // Weights of 127 (quants 127, scale 1) and activation scale 127 / 127 = 1: each output is
    // 127 * sum(round_even(x)), exact in f32.
    let want: f32 = 127.0
        * x.iter()
            .map(|v| v.round_ties_even().clamp(-127.0, 127.0))
            .sum::<f32>();
    let got = q.matmul(&x, 1).unwrap();
    assert!(got.iter().all(|&g| g == want), "{got:?} vs {want}");
}
