"""Configuration: the YAML file and command-line flags, validated into frozen dataclasses.

A leaf: nothing here imports the rest of the mirror. Each section's model and parser has
its own module; these are the names the rest of the mirror uses.
"""

from mirror.config.auth import AuthConfig
from mirror.config.cache import CacheConfig
from mirror.config.cluster import ClusterConfig
from mirror.config.load import (
    Config,
    apply_overrides,
    config_from_mapping,
    config_from_text,
    load_config,
    read_config_text,
)
from mirror.config.log import LogConfig
from mirror.config.policy import PolicyConfig
from mirror.config.redis import RedisConfig
from mirror.config.s3 import S3Config
from mirror.config.server import ServerConfig
from mirror.config.storage import StorageConfig
from mirror.config.tls import TLSConfig
from mirror.config.upstreams import DEFAULT_UPSTREAM, DOCKER_HUB_HOSTS, UpstreamConfig
from mirror.config.values import ConfigError, parse_duration, parse_listen, parse_size, parse_url

__all__ = [
    "DEFAULT_UPSTREAM",
    "DOCKER_HUB_HOSTS",
    "AuthConfig",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "PolicyConfig",
    "RedisConfig",
    "S3Config",
    "ServerConfig",
    "StorageConfig",
    "TLSConfig",
    "UpstreamConfig",
    "apply_overrides",
    "config_from_mapping",
    "config_from_text",
    "load_config",
    "read_config_text",
    "parse_duration",
    "parse_listen",
    "parse_size",
    "parse_url",
]
