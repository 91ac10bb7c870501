//! Boot stub: the PVH 32-bit entry (with its ELF note and static identity page tables) and the
//! 64-bit entry every vCPU starts at, which loads the descriptor tables and drops to CPL 3.
//!
//! Everything here runs at CPL 0, which the PVM hosts emulate at ~600 ns per instruction, so it
//! is a few dozen instructions of assembly: the GDT and IDT are built by the linker (see
//! build.rs), the page tables for the PVH path are assembled as constant data, and the TSS
//! comes pre-filled from `cpu.rs`; only `rsp0` is stored at run time.

use crate::layout::{
    KERNEL_DATA_SEL, KERNEL_STACK_SIZE, MAX_CPUS, TSS_SEL_BASE, TSS_STRIDE, USER_CODE_SEL,
    USER_DATA_SEL, USER_STACK_SIZE,
};
use core::sync::atomic::{AtomicU32, Ordering};

/// Set to 1 by the 32-bit PVH stub: on that path only `[0, 4 GiB)` is mapped (our own page
/// tables), while the VMM's direct entry maps all guest RAM.
#[no_mangle]
static SPLITVISOR_BOOTED_VIA_PVH: AtomicU32 = AtomicU32::new(0);

/// Whether the guest came in through the PVH entry (QEMU and other PVH loaders).
pub fn booted_via_pvh() -> bool {
    SPLITVISOR_BOOTED_VIA_PVH.load(Ordering::Relaxed) != 0
}

/// RFLAGS for CPL 3: IOPL 3 (bits 12-13), the always-one bit 1, interrupts off. IOPL alone does
/// not open ports on the PVM hosts (the TSS I/O bitmap does), but it is correct elsewhere too.
const USER_RFLAGS: u64 = 0x3002;

core::arch::global_asm!(
    // --- XEN_ELFNOTE_PHYS32_ENTRY: owner "Xen", type 18, 64-bit descriptor = 32-bit entry. ---
    ".section .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4, 8, 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad splitvisor_pvh_entry32",
    // --- The splitvisor note: owner "splitvisor", type 1, desc = boot contract version 1. The
    // VMM tells this guest from a Linux vmlinux by it (docs/boot-protocol.md). ---
    ".section .note.splitvisor, \"a\", @note",
    ".balign 4",
    ".long 11, 4, 1",
    ".asciz \"splitvisor\"",
    ".balign 4",
    ".long 1",
    // --- PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info. ---
    ".section .text.boot, \"ax\"",
    ".code32",
    ".globl splitvisor_pvh_entry32",
    "splitvisor_pvh_entry32:",
    "    cli",
    "    cld",
    "    movl $1, SPLITVISOR_BOOTED_VIA_PVH",
    "    lgdt splitvisor_gdt_ptr",
    // CR4: PAE (long mode), OSFXSR and OSXMMEXCPT (the compiled code uses SSE freely).
    "    movl $0x620, %eax",
    "    movl %eax, %cr4",
    "    movl $splitvisor_pvh_pml4, %eax",
    "    movl %eax, %cr3",
    "    movl $0xc0000080, %ecx", // EFER
    "    rdmsr",
    "    orl $0x100, %eax", // LME
    "    wrmsr",
    // CR0: PG, MP and PE on; EM and TS off so SSE instructions do not trap.
    "    movl %cr0, %eax",
    "    andl $~0xc, %eax",
    "    orl $0x80000003, %eax",
    "    movl %eax, %cr0",
    "    ljmp $0x08, $splitvisor_pvh_entry64",
    ".code64",
    "splitvisor_pvh_entry64:",
    // Upper register halves are undefined after the mode switch: zero-extend the start info.
    "    movl %ebx, %ebx",
    "    xorl %edi, %edi",
    // --- 64-bit entry: CPL 0, RDI = vCPU index, RBX = hvm_start_info, RSP = 0. ---
    ".globl splitvisor_entry64",
    "splitvisor_entry64:",
    "    cmpq ${max_cpus}, %rdi",
    "    jae 9f",
    // The CPL-0 stack of this vCPU (also its TSS rsp0): kernel_stacks + (index + 1) * size.
    "    leaq 1(%rdi), %rax",
    "    imulq ${kstack}, %rax, %rsp",
    "    leaq splitvisor_kernel_stacks(%rip), %rcx",
    "    addq %rcx, %rsp",
    "    imulq ${tss_stride}, %rdi, %rax",
    "    leaq SPLITVISOR_TSS(%rip), %rcx",
    "    movq %rsp, 4(%rcx, %rax)",
    "    lgdt splitvisor_gdt_ptr(%rip)",
    "    lidt splitvisor_idt_ptr(%rip)",
    "    movl ${kdata}, %eax",
    "    movl %eax, %ds",
    "    movl %eax, %es",
    "    movl %eax, %ss",
    "    xorl %eax, %eax",
    "    movl %eax, %fs",
    "    movl %eax, %gs",
    // Each vCPU has its own TSS descriptor, as ltr marks the descriptor busy.
    "    movl %edi, %eax",
    "    shll $4, %eax",
    "    addl ${tss_sel}, %eax",
    "    ltr %ax",
    // iretq to CPL 3 on this vCPU's user stack; RDI and RBX survive for splitvisor_main.
    "    leaq 1(%rdi), %rax",
    "    imulq ${ustack}, %rax, %rax",
    "    leaq splitvisor_user_stacks(%rip), %rcx",
    "    addq %rcx, %rax",
    "    pushq ${udata}",
    "    pushq %rax",
    "    pushq ${rflags}",
    "    pushq ${ucode}",
    "    leaq splitvisor_user_start(%rip), %rax",
    "    pushq %rax",
    "    iretq",
    // A vCPU beyond MAX_CPUS has no stack: it stops here for good.
    "9:  cli",
    "    hlt",
    "    jmp 9b",
    // --- First CPL-3 code: a proper call so the Rust entry sees an ABI-aligned stack. ---
    "splitvisor_user_start:",
    "    movq %rbx, %rsi",
    "    xorl %ebp, %ebp",
    "    call splitvisor_main",
    "    ud2",
    // --- Identity map of [0, 4 GiB) for the PVH path: 2 MiB pages, present|write|user. ---
    ".section .data.pagetables, \"aw\"",
    ".balign 4096",
    "splitvisor_pvh_pml4:",
    "    .quad splitvisor_pvh_pdpt + 0x7",
    "    .fill 511, 8, 0",
    "splitvisor_pvh_pdpt:",
    "    .quad splitvisor_pvh_pd + 0x7, splitvisor_pvh_pd + 0x1007",
    "    .quad splitvisor_pvh_pd + 0x2007, splitvisor_pvh_pd + 0x3007",
    "    .fill 508, 8, 0",
    "splitvisor_pvh_pd:",
    "    .set splitvisor_page, 0",
    "    .rept 2048",
    "    .quad splitvisor_page + 0x87",
    "    .set splitvisor_page, splitvisor_page + 0x200000",
    "    .endr",
    // --- Per-vCPU stacks (zero-filled by the loader like all of .bss, never initialised). ---
    ".section .bss.stacks, \"aw\", @nobits",
    ".balign 4096",
    "splitvisor_kernel_stacks:",
    "    .skip {kstack} * {max_cpus}",
    "splitvisor_user_stacks:",
    "    .skip {ustack} * {max_cpus}",
    ".text",
    max_cpus = const MAX_CPUS,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    tss_stride = const TSS_STRIDE,
    tss_sel = const TSS_SEL_BASE,
    kdata = const KERNEL_DATA_SEL,
    udata = const USER_DATA_SEL,
    ucode = const USER_CODE_SEL,
    rflags = const USER_RFLAGS,
    options(att_syntax),
);
