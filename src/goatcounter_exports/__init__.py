"""goatcounter-exports: GoatCounter's export API as REST and MCP, served from a capability spec."""

__version__ = "0.1.0"
