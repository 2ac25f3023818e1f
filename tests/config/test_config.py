import pytest

from atoll.config import ConfigError, load_config

GOOD = """
[system]
name = "shop"
transport = "sqlite:///bus.db"

[services.orders]
app = "shop.orders:service"
port = 8080

[services.inventory]
app = "shop.inventory:service"
port = 8081
database = "sqlite:///inv.db?synchronous=NORMAL"
"""


def write(tmp_path, text, name="atoll.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_file_loads_with_defaults(tmp_path):
    loaded = load_config(write(tmp_path, GOOD), environ={})
    assert loaded.config.system.name == "shop"
    assert loaded.service("orders").host == "127.0.0.1"
    assert loaded.database_url("orders") == "sqlite:///orders.db"
    assert loaded.database_url("inventory") == "sqlite:///inv.db?synchronous=NORMAL"
    assert loaded.data_dir == (tmp_path / ".atoll").resolve()
    assert loaded.service("orders").instances == 1
    assert list(loaded.service("orders").ports) == [8080]


def test_instances_take_consecutive_ports(tmp_path):
    text = GOOD.replace("port = 8081", "port = 8090\ninstances = 3")
    loaded = load_config(write(tmp_path, text), environ={})
    assert list(loaded.service("inventory").ports) == [8090, 8091, 8092]


def test_the_collector_runs_at_the_normal_priority_unless_configured(tmp_path):
    assert load_config(write(tmp_path, GOOD), environ={}).config.system.collector.nice == 0
    environ = {"ATOLL__SYSTEM__COLLECTOR__NICE": "10"}
    assert load_config(write(tmp_path, GOOD), environ=environ).config.system.collector.nice == 10


def test_environment_overrides_any_key(tmp_path):
    environ = {
        "ATOLL__SYSTEM__TRANSPORT": "memory://",
        "ATOLL__SERVICES__ORDERS__PORT": "9090",
        "ATOLL__SERVICES__ORDERS__ENV__GREETING": "hello world",
        "UNRELATED": "x",
    }
    loaded = load_config(write(tmp_path, GOOD), environ=environ)
    assert loaded.config.system.transport == "memory://"
    assert loaded.service("orders").port == 9090
    assert loaded.service("orders").env == {"GREETING": "hello world"}


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (GOOD.replace("port = 8080", 'port = "eighty"'), "services.orders.port", "expected `int`"),
        (GOOD.replace("port = 8080", "prot = 8080"), "services.orders.prot", "unknown key"),
        (GOOD.replace("port = 8080", "port = 70000"), "services.orders.port", "not a TCP port"),
        (GOOD.replace("port = 8081", "port = 8080"), "services.inventory.port", "already used"),
        (
            GOOD.replace("sqlite:///bus.db", "kafka://x"),
            "system.transport",
            "unsupported URL scheme",
        ),
        (
            GOOD.replace('app = "shop.orders:service"', 'app = "shop.orders"'),
            "services.orders.app",
            "package.module:attribute",
        ),
        (
            GOOD.replace('[services.orders]\napp = "shop.orders:service"\n', "[services.orders]\n"),
            "services.orders",
            "missing required field `app`",
        ),
        (GOOD + "\n[surprise]\nx = 1\n", "surprise", "unknown key"),
        (
            GOOD.replace('name = "shop"', 'name = "shop"\ncollector = {nice = 25}'),
            "system.collector.nice",
            "must be 0 to 19",
        ),
        (
            GOOD.replace("port = 8080", "port = 8080\ninstances = 0"),
            "services.orders.instances",
            "must be between 1 and 64",
        ),
        (  # orders' second instance would take inventory's port
            GOOD.replace("port = 8080", "port = 8080\ninstances = 2"),
            "services.inventory.port",
            "8081 is already used by orders",
        ),
        (
            GOOD.replace("port = 8080", "port = 65535\ninstances = 2"),
            "services.orders.instances",
            "run past 65535",
        ),
    ],
    ids=[
        "wrong-type",
        "unknown-key",
        "bad-port",
        "port-clash",
        "bad-url",
        "bad-app",
        "missing",
        "unknown-section",
        "collector-nice-out-of-range",
        "no-instances",
        "instance-port-clash",
        "instance-ports-past-65535",
    ],
)
def test_each_problem_names_the_file_and_the_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    error = caught.value
    assert error.key == key
    assert problem in error.problem
    assert str(path) in str(error)
    assert key in str(error)


def test_a_bad_environment_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), environ={"ATOLL__SERVICES__ORDERS__PORT": "many"})
    assert caught.value.key == "services.orders.port"


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[system\n"), environ={})


PROFILES = (
    GOOD
    + """
[profiles.production.system]
transport = "nats://127.0.0.1:4222"

[profiles.production.services.orders]
database = "postgresql://app:${DB_PASSWORD}@db/shop?schema=orders"
"""
)


def test_a_profile_overlays_the_file_and_variables_fill_in_secrets(tmp_path):
    path = write(tmp_path, PROFILES)
    plain = load_config(path, environ={})
    assert plain.config.system.transport == "sqlite:///bus.db"
    assert plain.service("orders").database is None
    prod = load_config(path, environ={"DB_PASSWORD": "pw"}, profile="production")
    assert prod.profile == "production"
    assert prod.config.system.transport == "nats://127.0.0.1:4222"
    assert prod.service("orders").database == "postgresql://app:pw@db/shop?schema=orders"
    assert prod.service("orders").port == 8080, "the profile dropped keys it did not set"
    via_env = load_config(path, environ={"ATOLL_PROFILE": "production", "DB_PASSWORD": "x"})
    assert via_env.profile == "production"


def test_an_unknown_profile_or_missing_variable_is_named(tmp_path):
    path = write(tmp_path, PROFILES)
    with pytest.raises(
        ConfigError, match=r"profiles\.staging: no such profile \(known: production\)"
    ):
        load_config(path, environ={}, profile="staging")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, profile="production")
    assert caught.value.key == "services.orders.database"
    assert "DB_PASSWORD is not set" in caught.value.problem
