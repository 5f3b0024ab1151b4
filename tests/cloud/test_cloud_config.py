"""The [cloud] config section and the boot script renderer."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from facefleet.config import load_settings
from facefleet.scheduler.cloud.backend import BootSpec, render_boot_script


def test_cloud_pools_load_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "facefleet.toml"
    config.write_text(
        '[cloud]\nenabled = true\nscheduler_address = "sched:50051"\n'
        '[cloud.aws]\nlaunch_template = "lt-0abc"\n'
        '[[cloud.pools]]\nname = "aws-use1-g5"\nprovider = "aws"\nregion = "us-east-1"\n'
        'instance_type = "g5.xlarge"\nmax_instances = 4\nmax_price_usd_per_hour = 1.2\n'
    )
    settings = load_settings(config)
    [pool] = settings.cloud.pools
    assert (pool.name, pool.max_instances, pool.max_price_usd_per_hour) == ("aws-use1-g5", 4, 1.2)
    assert settings.cloud.aws.launch_template == "lt-0abc"

    config.write_text('[[cloud.pools]]\nname = "x"\nprovider = "gcp"\nregion = "r"\ninstance_type = "t"\n')
    with pytest.raises(ValidationError, match="provider"):
        load_settings(config)


def test_boot_script_quotes_every_value() -> None:
    spec = BootSpec(pool="gpu; rm -rf /", instance_id="ff-1", scheduler="s:1", provider="aws",
                    region="us-east-1", tls_dir="/etc/facefleet/certs")  # fmt: skip
    script = render_boot_script(spec)
    assert "--pool 'gpu; rm -rf /' --trust-zone cloud" in script
    assert "$TLS_DIR" in script and "${" not in script  # template fully substituted, shell vars intact
    with pytest.raises(ValueError, match="scheduler_address"):
        render_boot_script(BootSpec("p", "i", "", "aws", "r", "/d"))
