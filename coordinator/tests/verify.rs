//! Every way a stage result can be wrong is refused with its reason: another request's
//! result (replay), another signer, a forged signature, digests that do not match, another
//! model or layer range, and outputs of the wrong kind, shape or value.

use potluck_coordinator::verify::{check_result, Expected, ResultRejection};
use potluck_protocol::messages::{
    DeviceKind, LayerRange, NumericClass, Receipt, ReceiptBody, StageForward, StageInputWire,
    StageOutputWire, StageResult,
};
use potluck_protocol::receipt::{input_id, job_id, output_id};
use potluck_protocol::signed::Keypair;
use potluck_protocol::tensor::{WireDType, WireTensor};

const MODEL: [u8; 32] = [7; 32];
const LAYERS: LayerRange = LayerRange { start: 0, end: 10 };

fn request(step: u64, tokens: Vec<u32>) -> StageForward {
    StageForward {
        session: 5,
        step,
        position: 0,
        input: StageInputWire::Tokens(tokens),
        sample: None,
    }
}

fn hidden(rows: usize, cols: usize, value: f32) -> StageOutputWire {
    let v = vec![value; rows * cols];
    StageOutputWire::Hidden(WireTensor::from_f32(&v, &[rows, cols], WireDType::F32).unwrap())
}

/// An honest answer to `req` with `output`, signed by `key`.
fn answer(req: &StageForward, output: StageOutputWire, key: &Keypair) -> StageResult {
    let body = ReceiptBody {
        job: job_id(req).unwrap(),
        input: input_id(&req.input).unwrap(),
        output: output_id(&output).unwrap(),
        model: MODEL,
        layers: LAYERS,
        numeric: NumericClass {
            weights: "Q4_1".into(),
            accumulation: "f32".into(),
            device: DeviceKind::Cpu,
        },
    };
    StageResult {
        session: req.session,
        step: req.step,
        output,
        receipt: Receipt::sign(body, key).unwrap(),
    }
}

fn expected<'a>(signer: &'a potluck_protocol::signed::PublicKey, last: bool) -> Expected<'a> {
    Expected {
        signer,
        model: &MODEL,
        layers: LAYERS,
        last,
        hidden: 4,
        vocab: 100,
    }
}

#[test]
fn an_honest_result_passes_and_each_tampering_is_named() {
    let key = Keypair::from_secret(&[1; 32]);
    let other = Keypair::from_secret(&[2; 32]);
    let pk = key.public();
    let req = request(0, vec![1, 2, 3]);
    let good = answer(&req, hidden(3, 4, 0.5), &key);
    let want = expected(&pk, false);
    assert_eq!(check_result(&req, &good, &want), Ok(()));

    // Replay: step 0's result offered for step 1 with the same input.
    let next = request(1, vec![1, 2, 3]);
    assert!(matches!(
        check_result(&next, &good, &want),
        Err(ResultRejection::WrongRequest { .. })
    ));
    // Replay with the echo rewritten: the receipt's job digest gives it away.
    let mut relabelled = good.clone();
    relabelled.step = 1;
    assert_eq!(
        check_result(&next, &relabelled, &want),
        Err(ResultRejection::Digest("job"))
    );
    // Same request shape, other input.
    let other_input = request(0, vec![9, 9, 9]);
    assert_eq!(
        check_result(&other_input, &good, &want),
        Err(ResultRejection::Digest("input"))
    );
    // Signed honestly by a peer that is not the planned one.
    let stranger = answer(&req, hidden(3, 4, 0.5), &other);
    assert_eq!(
        check_result(&req, &stranger, &want),
        Err(ResultRejection::WrongSigner)
    );
    // Output swapped after signing.
    let mut swapped = good.clone();
    swapped.output = hidden(3, 4, 0.25);
    assert_eq!(
        check_result(&req, &swapped, &want),
        Err(ResultRejection::Digest("output"))
    );
    // Receipt body edited after signing (claims other layers): the signature breaks.
    let mut forged = good.clone();
    forged.receipt.body.layers = LayerRange { start: 0, end: 30 };
    assert!(matches!(
        check_result(&req, &forged, &want),
        Err(ResultRejection::Signature(_))
    ));
    // Honestly signed, but for other layers or another model.
    let mut want_other_layers = want.clone();
    want_other_layers.layers = LayerRange { start: 10, end: 20 };
    assert_eq!(
        check_result(&req, &good, &want_other_layers),
        Err(ResultRejection::WrongLayers(LAYERS))
    );
    let other_model = [8; 32];
    let mut want_other_model = want.clone();
    want_other_model.model = &other_model;
    assert_eq!(
        check_result(&req, &good, &want_other_model),
        Err(ResultRejection::WrongModel)
    );
}

#[test]
fn outputs_of_the_wrong_kind_shape_or_value_are_refused_even_when_signed() {
    let key = Keypair::from_secret(&[1; 32]);
    let pk = key.public();
    let req = request(0, vec![1, 2, 3]);
    let middle = expected(&pk, false);
    let last = expected(&pk, true);
    let bad = |output: StageOutputWire, want: &Expected<'_>| {
        matches!(
            check_result(&req, &answer(&req, output, &key), want),
            Err(ResultRejection::BadOutput(_))
        )
    };
    assert!(bad(hidden(2, 4, 0.5), &middle), "too few positions");
    assert!(bad(hidden(3, 5, 0.5), &middle), "wrong width");
    assert!(bad(hidden(3, 4, f32::NAN), &middle), "NaN");
    assert!(
        bad(hidden(3, 4, 0.5), &last),
        "hidden states from the last stage"
    );
    let token = |t: u32, lp: f32| StageOutputWire::Token {
        token: t,
        logprob: lp,
        top: Vec::new(),
    };
    assert!(bad(token(5, -0.1), &middle), "a token from a middle stage");
    assert!(bad(token(100, -0.1), &last), "token beyond the vocabulary");
    assert!(bad(token(5, 0.5), &last), "positive log-probability");
    assert!(bad(token(5, f32::NAN), &last), "NaN log-probability");
    assert_eq!(
        check_result(&req, &answer(&req, token(5, -0.1), &key), &last),
        Ok(())
    );
}
