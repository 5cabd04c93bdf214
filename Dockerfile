# train-llama GPU image: the same pinned stack as requirements.txt with a CUDA build of torch.
# Used by the Hugging Face Space (Docker SDK) and by `docker run --gpus all`.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/user/.cache/huggingface

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Spaces run containers as uid 1000.
RUN userdel -r ubuntu 2>/dev/null || true \
    && useradd -m -u 1000 user \
    && python3 -m venv /opt/venv \
    && chown -R user:user /opt/venv

USER 1000
WORKDIR /home/user/app

# Dependencies first, so code changes do not reinstall them. torch from PyPI is the CUDA build here;
# deepspeed builds against it (no build isolation).
COPY --chown=user:user requirements.txt constraints.txt ./
RUN pip install -c constraints.txt pip wheel setuptools \
    && pip install -c constraints.txt torch \
    && pip install -c constraints.txt -r requirements.txt \
    && pip install --no-build-isolation -c constraints.txt deepspeed

COPY --chown=user:user . .

# tini as PID 1 reaps children and passes SIGTERM to trainer.sh, which forwards it to Python.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["./trainer.sh"]
