"""How every client reaches the brokers: one description, rendered for each client library.

The worker, the producers and the admin speak librdkafka (confluent-kafka); the stream processor
speaks Faust (aiokafka). Both renderings come from this one object, so a security setting can
never reach one client and miss the other.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Literal

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; empty: PLAIN where SASL is on
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        shown = "***" if self.sasl_password else ""
        return (
            f"KafkaConnection(bootstrap_servers={self.bootstrap_servers!r}, "
            f"security_protocol={self.security_protocol!r}, sasl_mechanism={self.sasl_mechanism!r}, "
            f"sasl_username={self.sasl_username!r}, sasl_password={shown!r})"
        )

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def librdkafka(self) -> dict[str, Any]:
        """Settings for confluent-kafka clients (producer, consumer, admin)."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.uses_sasl:
            config["sasl.mechanism"] = self.sasl_mechanism or "PLAIN"
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password
        for key, value in (
            ("ssl.ca.location", self.ssl_cafile),
            ("ssl.certificate.location", self.ssl_certfile),
            ("ssl.key.location", self.ssl_keyfile),
        ):
            if value and self.uses_tls:
                config[key] = value
        return config

    def faust_broker(self) -> str:
        """Faust's `broker` setting: one `kafka://host:port` URL per bootstrap server."""
        return ";".join(f"kafka://{server.strip()}" for server in self.bootstrap_servers.split(",") if server.strip())

    def faust_credentials(self) -> Any:
        """Faust's `broker_credentials`: None in plain text, else SASL or TLS credentials.

        Faust is imported here, not at the top: the contract's users (producers, the worker)
        never need it.
        """
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust

        context = self.ssl_context() if self.uses_tls else None
        if self.uses_sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism or "PLAIN",
                ssl_context=context,
            )
        return faust.SSLCredentials(context)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context
