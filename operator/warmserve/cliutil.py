"""What every `warmserve` command line shares: help layout, exit codes, and the Kubernetes-cluster check.

Used by every command: `warmserve simulate` and `up`, the operator (`warmserve.controller`), the router and the
worker. It imports nothing beyond the standard library at module level, so `--help` stays fast and works
without the extras; the cluster check imports the `kubernetes` client (operator and worker extras) when called.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

#: Exit codes of every `warmserve` command (docs/operator.md, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # a failure while running (e.g. the router's port is taken)
EXIT_USAGE = 2  # bad flags or configuration, a missing extra (argparse uses 2 as well)
EXIT_NO_CLUSTER = 3  # the command needs a Kubernetes cluster and none is configured or usable

DEFAULT_KUBECONFIG = "~/.kube/config"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each option's help with its default.

    Like `argparse.ArgumentDefaultsHelpFormatter`, but it also shows the default of an option without help, says
    nothing for a default of None or False (a flag, or a value worked out later: the help says how), and leaves
    help that already names its default.
    """

    @staticmethod
    def _default_text(action: argparse.Action) -> str | None:
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            return None
        if default == [] or default == ():
            return None
        if isinstance(default, range):
            return f"{default.start}-{default.stop - 1}"
        if default == "":
            return '""'
        return "%(default)s"

    def add_argument(self, action: argparse.Action) -> None:
        shown = self._default_text(action)
        if action.help is None and shown is not None:
            action = copy.copy(action)  # the parser's own action stays as it is
            action.help = f"(default: {shown})"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = self._default_text(action)
        if shown is None or "default" in text:
            return text
        return f"{text} (default: {shown})"


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def kubeconfig_paths() -> list[str]:
    """The kubeconfig files a Kubernetes client reads: $KUBECONFIG (a path list) or ~/.kube/config."""
    value = os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    return [path for path in value.split(os.pathsep) if path]


def cluster_problem() -> str | None:
    """Why no Kubernetes API is configured for this process, as one sentence; None when one is.

    Loads the configuration the way the official `kubernetes` client does (and kopf's `login_via_client`, the
    operator's login handler, and the worker's client): the pod's service account first, then the kubeconfig.
    No global client configuration is changed. No API server is contacted, but a kubeconfig's exec or auth
    plugin runs (it may fetch a token) as it would for a real login.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config(client_configuration=client.Configuration())
        return None
    except config.ConfigException as error:
        in_cluster = _first_line(error)
    paths = kubeconfig_paths()
    existing = [path for path in paths if os.path.exists(os.path.expanduser(path))]
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if existing:
        try:
            config.load_kube_config(config_file=os.pathsep.join(paths), client_configuration=client.Configuration())
            return None
        except Exception as error:  # ConfigException, YAML and OS errors: whatever makes the file unusable
            return (
                f"cannot use the kubeconfig {os.pathsep.join(existing)}: {_first_line(error)}; "
                "fix it, or point KUBECONFIG at a working one"
            )
    kubeconfig = os.environ.get("KUBECONFIG")
    where = f"{kubeconfig} ($KUBECONFIG)" if kubeconfig else f"{DEFAULT_KUBECONFIG}, KUBECONFIG not set"
    if in_pod:
        return (
            f"in a pod, but its service account cannot be used ({in_cluster}) and there is no kubeconfig at "
            f"{where}; mount the service account token (automountServiceAccountToken) or set KUBECONFIG"
        )
    return (
        f"no Kubernetes cluster configured (no in-cluster service account, no kubeconfig at {where}); "
        "set KUBECONFIG or run it inside a pod"
    )


def require_cluster(program: str) -> int | None:
    """None when a cluster is configured; otherwise print one line to stderr and return `EXIT_NO_CLUSTER`."""
    problem = cluster_problem()
    if problem is None:
        return None
    print(f"{program}: {problem}", file=sys.stderr)
    return EXIT_NO_CLUSTER
