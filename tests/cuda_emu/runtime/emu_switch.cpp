// emu_switch_context(save_sp, load_sp) for x86-64 (System V): pushes the callee-saved
// registers and the SSE/x87 control words on the current stack, stores the stack pointer in
// *save_sp, and resumes the context whose stack pointer is load_sp (see make_context in
// emu_cuda.h for the frame a new context starts from).
#if defined(__x86_64__)
asm(R"(
    .text
    .globl emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
    .section .note.GNU-stack,"",@progbits
)");
#endif
