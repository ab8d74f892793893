"""Brings the default stack up, shows where each service listens, and stops it again."""

import asyncio

from dspy_agent_infra import AgentInfra


async def main() -> None:
    async with AgentInfra.start() as infra:
        for name, service in infra.services.items():
            print(f"{name:<10} {service.status:<8} {service.url}")
        print("REDIS_URL =", infra.env["REDIS_URL"])


if __name__ == "__main__":
    asyncio.run(main())
