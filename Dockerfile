# The slim serve image: ONNX Runtime + FastAPI + uvicorn, no PyTorch at run time.
#
#   docker build -t imgrec-serve .                                  # the ImageNet model
#   docker build -t my-classifier --build-arg MODEL=runs/mnist .    # a bundle in this folder
#   docker build -t imgrec-serve-int8 --build-arg INT8=1 .          # serve the int8 export
#   docker run --rm -p 8000:8000 imgrec-serve                       # http://localhost:8000/
#
# Stage 1 exports the model to ONNX (that needs PyTorch); stage 2 installs only imgrec[serve]
# and copies the exported bundle (imgrec.json + model.onnx) from stage 1.
# A CPU-only PyTorch index for stage 1 can be given with --build-arg PIP_EXTRA_INDEX_URL=...

FROM python:3.11-slim AS export
ARG MODEL=imagenet
ARG INT8=
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 IMGREC_MODELS=/models
WORKDIR /src
COPY . .
RUN pip install -c constraints.txt '.[train]'
RUN imgrec export "$MODEL" ${INT8:+--int8} \
 && python -c "import shutil, sys; from imgrec.zoo import open_bundle; \
b = open_bundle(sys.argv[1]); \
shutil.copytree(b.path, '/bundle', ignore=shutil.ignore_patterns( \
    'model.safetensors', 'events.*', 'checkpoint*', 'evaluation', '.*'))" "$MODEL"

FROM python:3.11-slim
# INT8=1: the image serves the int8 export stage 1 made (imgrec serve --int8)
ARG INT8=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PORT=8000 WORKERS=1 IMGREC_MODELS=/tmp/imgrec-models INT8=$INT8
WORKDIR /src
COPY . .
RUN pip install -c constraints.txt '.[serve]' \
 && rm -rf /src \
 && useradd --create-home --uid 10001 imgrec
WORKDIR /home/imgrec
COPY --from=export /bundle /bundle
USER imgrec
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=4)"
# exec: uvicorn gets SIGTERM itself and finishes in-flight requests before it exits.
CMD ["sh", "-c", "exec imgrec serve /bundle --host 0.0.0.0 --port \"$PORT\" --workers \"$WORKERS\" ${INT8:+--int8}"]
