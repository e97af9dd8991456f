"""The workshop design, as the baseline for benchmarks/serve_load.py: a Flask upload form
that runs the model in eager PyTorch, one request at a time (threaded=False).

Same model (the efficientnet_lite0 ImageNet bundle), same decoding and preprocessing
(imgrec's contract), same JSON answer as `imgrec serve`; only the serving design differs.

    python benchmarks/flask_baseline.py --port 5000
    curl -F file=@src/imgrec/samples/chelsea.jpg http://127.0.0.1:5000/predict
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flask import Flask, jsonify, request

from imgrec.contract import load_input
from imgrec.errors import ImgrecError
from imgrec.network import load_model
from imgrec.predict import softmax
from imgrec.zoo import open_bundle


def create_app(model: str = "imagenet") -> Flask:
    bundle = open_bundle(model, need_weights=True)
    net = load_model(bundle).eval()
    contract = bundle.preprocess
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 10 * 1024 * 1024

    @app.post("/predict")
    def predict():
        start = time.perf_counter()
        upload = request.files.get("file")
        data = upload.read() if upload else request.get_data()
        try:
            pixels = load_input(data, contract)
        except ImgrecError as e:
            return jsonify({"error": {"code": e.code, "message": str(e)}}), e.http_status
        with torch.no_grad():
            logits = net(torch.from_numpy(contract.normalize(pixels[None]))).numpy()
        probs = softmax(logits, bundle.temperature)[0]
        top = np.argsort(-probs)[:5]
        return jsonify({
            "model": bundle.name,
            "predictions": [{"label": bundle.classes[i], "index": int(i),
                             "probability": float(probs[i])} for i in top],
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 2),
        })

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--torch-threads", type=int,
                    help="PyTorch intra-op threads (default: PyTorch's own, as the workshop "
                         "runs it); 1 on a busy shared machine, where two OpenMP threads "
                         "waiting on each other took 2 s a request instead of 40 ms")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    create_app(args.model).run(host=args.host, port=args.port, threaded=False, debug=False)


if __name__ == "__main__":
    main()
