//! Modbus against the meter simulator over real loopback sockets and a real serial line: the bus
//! client, the technician's probe and scan, and the simulator under load. One test binary for
//! the area.

mod bad_input;
mod client;
mod probe;
mod serial;
mod sim_load;
