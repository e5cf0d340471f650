# Two commands set everything up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main job (4 CPU ranks via torchrun)
#   make test   - create .venv if missing, install, run the whole test suite
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.seqpar-installed
# CPU install path: the CPU build of torch is pinned so no dependency can pull a CUDA build.
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev

.PHONY: demo test bench bench-linear bench-scaling bench-two-nodes bench-model simulate calibrate clean

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node 4 -m benchmarks.demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	# DeepSpeed-Ulysses is one of the peers measured (torch pinned so it cannot pull a CUDA build)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[deepspeed]" "$(TORCH)"
	$(PYTHON) -m benchmarks.attention

bench-linear: $(STAMP)
	$(PYTHON) -m benchmarks.linear_scaling

bench-scaling: $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[deepspeed]" "$(TORCH)"
	$(PYTHON) -m benchmarks.scaling

bench-two-nodes: $(STAMP)
	# needs root: network namespaces and a tc-shaped veth pair (removed afterwards)
	$(PYTHON) -m benchmarks.two_nodes

bench-model: $(STAMP)
	$(PYTHON) -m benchmarks.model_agreement

simulate: $(STAMP)
	$(PYTHON) -m benchmarks.simulate

calibrate: $(STAMP)
	$(PYTHON) -m seqpar.cost calibrate --ranks 2 --out benchmarks/results/profile-$$(hostname).json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
