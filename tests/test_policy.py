"""Site policy: layers and their sources, limits, locked keys, allowed roots, checks."""
import json
import os

import pytest
from click.testing import CliRunner

from hpcmove import cli, db, jobs, policy
from hpcmove.units import parse_duration

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "templates", "policy.example.toml")


def site_from(text, tmp_path, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return policy.parse_site(policy._read_toml(str(path)), str(path))


def resolve(site, user=None, env=None, cli_values=None):
    return policy.resolve(site, user or {}, "/home/u/.config/hpcmove/config.toml",
                          env or {}, cli_values or {})


def test_precedence_cli_over_env_over_user_over_site(tmp_path):
    site = site_from('[defaults]\nqos = "site"\naccount = "site"\ntime = "1:00:00"\n'
                     'partition = "site"\n', tmp_path)
    eff = resolve(site, user={"qos": "user", "account": "user", "time": "2:00:00"},
                  env={"HPCMOVE_QOS": "env", "HPCMOVE_ACCOUNT": "env"},
                  cli_values={"qos": ("cli", "--qos")})
    assert (eff["qos"], eff.values["qos"].source) == ("cli", "--qos")
    assert (eff["account"], eff.values["account"].source) == ("env", "HPCMOVE_ACCOUNT")
    assert eff["time"] == "2:00:00" and eff.values["time"].source.startswith("user ")
    assert eff["partition"] == "site" and eff.values["partition"].source.startswith("site ")
    assert eff.values["rate"].source == "built-in"


def test_locked_key_refuses_a_different_value_and_names_the_file(tmp_path):
    site = site_from('[defaults]\npartition = "dtn"\n[limits]\nlocked = ["partition"]\n', tmp_path)
    assert resolve(site, cli_values={"partition": ("dtn", "-p")})["partition"] == "dtn"
    with pytest.raises(policy.PolicyError, match=r"partition is locked .*policy.toml"):
        resolve(site, cli_values={"partition": ("compute", "--partition")})


def test_limit_clamps_with_a_note(tmp_path):
    site = site_from("[limits]\nmax_stripe_width = 2\n", tmp_path)
    eff = resolve(site, cli_values={"stripe_width": (16, "--stripe-width")})
    assert eff["stripe_width"] == 2
    assert "clamped" in eff.notes[0] and "max_stripe_width" in eff.notes[0]
    assert "capped by limits.max_stripe_width" in eff.values["stripe_width"].source


def test_limit_refuses_when_the_site_says_so(tmp_path):
    site = site_from('[limits]\nmax_stripe_width = 2\non_exceed = "refuse"\n', tmp_path)
    with pytest.raises(policy.PolicyError, match=r"stripe_width 16 is over .*max_stripe_width = 2.*"
                                                 r"policy.toml.*--stripe-width"):
        resolve(site, cli_values={"stripe_width": (16, "--stripe-width")})


def test_running_task_limit_also_caps_the_default_width(tmp_path):
    site = site_from("[limits]\nmax_running_tasks_per_user = 3\n", tmp_path)
    assert site.width_cap == 3


def test_unlimited_bwlimit_is_capped_by_the_site(tmp_path):
    site = site_from('[limits]\nmax_bwlimit = "100M"\n', tmp_path)
    assert resolve(site)["bwlimit"] == 100 << 20


@pytest.mark.parametrize("text, message", [
    ("[defaults]\npartion = 'dtn'\n", "unknown key defaults.partion"),
    ("[default]\n", "unknown key default"),
    ("[defaults]\nstripe_width = 'many'\n", "defaults.stripe_width"),
    ("[defaults]\nslice_size = 'huge'\n", "defaults.slice_size: not a size"),
    ("[limits]\non_exceed = 'maybe'\n", "limits.on_exceed"),
    ("[limits]\nlocked = ['nope']\n", "limits.locked names unknown key 'nope'"),
    ("[[size_table]]\nmin_size = '1G'\n", "size_table[0]"),
    ("[defaults\n", "line 1"),
    ("[remote]\nsocket_ttl = 'soon'\n", "remote.socket_ttl: not a lifetime"),
    ("[remote]\nmax_socket_ttl = 7200\n", "remote.max_socket_ttl: expected a string"),
    ("[remote]\nsocket_ttl = '8h'\nmax_socket_ttl = '2h'\n",
     "remote.socket_ttl is above remote.max_socket_ttl"),
    ("[remote]\nconnections = 12\n", "remote.connections must be 1 to 9"),
    ("[remote]\nttl = '1h'\n", "unknown key remote.ttl"),
])
def test_broken_policy_errors_name_the_key_or_line(tmp_path, text, message):
    with pytest.raises(policy.PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        site_from(text, tmp_path)


def test_the_shipped_example_is_valid():
    site = policy.parse_site(policy._read_toml(EXAMPLE), EXAMPLE)
    assert site.defaults["partition"] == "dtn" and site.size_table[0][1] == 64 << 20


def test_allowed_roots_refuse_dotdot_and_escaping_symlinks(tmp_path):
    root = tmp_path / "scratch"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    site = site_from(f'[paths]\nallowed_roots = ["{root}"]\n', tmp_path)
    policy.check_path(site, str(root / "ok"), "source")
    policy.check_path(site, str(root / "ok" / ".." / "ok"), "source")
    for bad in (root / ".." / "outside", root / "escape", root / "escape" / "x"):
        with pytest.raises(policy.PolicyError, match="outside paths.allowed_roots"):
            policy.check_path(site, str(bad), "source")


def test_allowed_hosts_patterns(tmp_path):
    site = site_from('[remote]\nallowed_hosts = ["*.dtn.example.org"]\n', tmp_path)
    policy.check_host(site, "a.dtn.example.org")
    with pytest.raises(policy.PolicyError, match="remote.allowed_hosts"):
        policy.check_host(site, "evil.example.com")


def test_size_table_sets_slice_size_per_file_unless_the_user_chose(tmp_path):
    site = site_from('[[size_table]]\nmin_size = "0"\nslice_size = "1M"\n'
                     '[[size_table]]\nmin_size = "10M"\nslice_size = "4M"\n', tmp_path)
    opts = jobs.SubmitOptions.from_policy(resolve(site))
    from hpcmove.plan import Options
    o = Options(size_table=opts.size_table)
    assert (o.slice_size_for(5 << 20), o.slice_size_for(50 << 20)) == (1 << 20, 4 << 20)
    chosen = jobs.SubmitOptions.from_policy(resolve(site, cli_values={"slice_size": (8 << 20, "--slice-size")}))
    assert chosen.size_table == ()
    # slices of a size no one chose may be cut smaller to end in whole waves; yours not
    assert opts.even_waves and not chosen.even_waves


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("1:30", 90), ("1:00:00", 3600),
                                           ("2-00:00:00", 172800), ("1-2", 93600),
                                           ("UNLIMITED", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


# --- through the CLI --------------------------------------------------------------------

@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HPCMOVE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("HPCMOVE_USER_TEMPLATES", str(tmp_path / "user-templates"))
    for k in [k for k in os.environ if k.startswith("HPCMOVE_") and k not in (
            "HPCMOVE_HOME", "HPCMOVE_CONFIG", "HPCMOVE_USER_TEMPLATES")]:
        monkeypatch.delenv(k)
    yield tmp_path
    db.close()


def test_policy_show_reports_sources(env, monkeypatch):
    (env / "site.toml").write_text('[defaults]\nqos = "xfer"\npartition = "dtn"\n')
    (env / "config.toml").write_text('account = "proj1"\n')
    monkeypatch.setenv("HPCMOVE_POLICY", str(env / "site.toml"))
    monkeypatch.setenv("HPCMOVE_TIME", "0:30:00")
    result = CliRunner().invoke(cli.cli, ["policy", "show", "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)["settings"]
    assert s["qos"] == {"value": "xfer", "source": f"site {env / 'site.toml'}"}
    assert s["account"] == {"value": "proj1", "source": f"user {env / 'config.toml'}"}
    assert s["time"] == {"value": "0:30:00", "source": "HPCMOVE_TIME"}
    assert s["rate"]["source"] == "built-in"
    text = CliRunner().invoke(cli.cli, ["policy", "show"]).output
    assert "xfer" in text and str(env / "site.toml") in text
    assert "control sockets: --ttl 1h, --connections 1" in text
    (env / "site.toml").write_text("[remote]\nsocket_ttl = '30m'\nmax_socket_ttl = '8h'\n"
                                   "connections = 2\n")
    result = CliRunner().invoke(cli.cli, ["policy", "show", "--json"])
    assert json.loads(result.output)["sockets"] == {"ttl": "30m", "max_ttl": 28800,
                                                    "connections": 2}
    text = CliRunner().invoke(cli.cli, ["policy", "show"]).output
    assert "control sockets: --ttl 30m, at most 480 min, --connections 2" in text


def test_policy_check_rejects_a_broken_file(env):
    (env / "bad.toml").write_text('[defaults]\nstripe_width = "wide"\n')
    result = CliRunner().invoke(cli.cli, ["policy", "check", "--no-partitions", str(env / "bad.toml")])
    assert result.exit_code == 1
    assert "defaults.stripe_width" in result.output and "bad.toml" in result.output
    ok = CliRunner().invoke(cli.cli, ["policy", "check", "--no-partitions", EXAMPLE])
    assert ok.exit_code == 0 and ": ok" in ok.output


def test_refused_paths_record_and_submit_nothing(env, monkeypatch):
    allowed = env / "allowed"
    (allowed / "in").mkdir(parents=True)
    (allowed / "in" / "f").write_bytes(b"x")
    (allowed / "out").mkdir()
    (env / "secret").write_bytes(b"s")
    (allowed / "link").symlink_to(env / "secret")
    (env / "site.toml").write_text(f'[paths]\nallowed_roots = ["{allowed}"]\n')
    monkeypatch.setenv("HPCMOVE_POLICY", str(env / "site.toml"))
    cases = [[str(env / "secret"), str(allowed / "out")],
             [str(allowed / "in" / ".." / ".." / "secret"), str(allowed / "out")],
             [str(allowed / "link"), str(allowed / "out")],
             [str(allowed / "in"), str(env)]]
    for args in cases:
        result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", *args])
        assert result.exit_code == 1, args
        assert "outside paths.allowed_roots" in result.output and "site.toml" in result.output
    assert not (env / "home").exists()  # no database, no job directory: nothing recorded
    assert os.listdir(allowed / "out") == [] and sorted(os.listdir(env)) == sorted(
        ["allowed", "secret", "site.toml"])


def test_user_templates_may_not_shadow_locked_site_templates(env, monkeypatch):
    (env / "user-templates").mkdir()
    (env / "user-templates" / "transfer.sh.j2").write_text("#!/bin/bash\n")
    (env / "site.toml").write_text('[templates]\nlocked = ["transfer.sh.j2"]\n')
    monkeypatch.setenv("HPCMOVE_POLICY", str(env / "site.toml"))
    (env / "f").write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["submit", "--dry-run", "--backend", "local",
                                          str(env / "f"), str(env / "g")])
    assert result.exit_code == 1 and "locked templates" in result.output


def test_small_files_are_never_cut():
    from hpcmove.plan import Options
    o = Options(slice_size=1 << 20, small_file_threshold=4 << 20)
    assert o.slice_size_for(3 << 20) == 3 << 20 and o.slice_size_for(5 << 20) == 1 << 20


def test_per_user_bandwidth_is_shared_by_the_jobs_tasks(env, monkeypatch):
    (env / "site.toml").write_text('[limits]\nmax_bwlimit_per_user = "100M"\n')
    monkeypatch.setenv("HPCMOVE_POLICY", str(env / "site.toml"))
    (env / "f").write_bytes(b"x" * 100)
    (env / "d").mkdir()
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", "--stripe-width", "4",
                                          "--wait", str(env / "f"), str(env / "d")])
    assert result.exit_code == 0, result.output
    db.connect()
    assert json.loads(db.Job.select().first().options)["bwlimit"] == (100 << 20) // 4


def test_sockets_take_the_sites_lifetime_and_connections_within_its_cap(tmp_path):
    """A live socket opens the host to anything running as the user on that node: the
    site sets how long one lives by default and at most, and which hosts it may reach."""
    from hpcmove import ssh
    site = site_from("[remote]\nallowed_hosts = ['*.example.org']\nsocket_ttl = '30m'\n"
                     "max_socket_ttl = '2h'\nconnections = 2\n", tmp_path)
    assert ssh.settings(site, "alice@a.example.org") == (1800, 2)
    assert ssh.settings(site, "a.example.org", "2h", 1) == (7200, 1)
    with pytest.raises(policy.PolicyError, match="at most 120 min.*remote.max_socket_ttl"):
        ssh.settings(site, "a.example.org", "3h")
    with pytest.raises(policy.PolicyError, match="remote.allowed_hosts"):
        ssh.settings(site, "evil.example.com")
    assert ssh.settings(policy.Site(), "evil.example.com") == (3600, 1)  # no policy
