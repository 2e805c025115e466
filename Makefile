.PHONY: test demo services lint
test:      ## venv, services, migrations, the whole test suite
	scripts/test
demo:      ## the whole loop end to end on the bundled Sentinel-2 sample
	scripts/demo
services:  ## install/start PostGIS and Redis on loopback
	scripts/setup-services
lint:
	.venv/bin/ruff check .
